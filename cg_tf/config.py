"""The frozen experiment configuration that the library takes instead of flags.

Each setting is defined once, as a field of `Config`: its name (also the
flag's, --name), its type, its default, its bounds or choices and its help
text (the field's metadata). run.py defines its flags from these fields, and
the aggregators (aggregators.py) check their settings against them. This
module loads no TensorFlow, so bad settings are refused before it loads.
"""

import dataclasses
import json
import typing
from typing import Optional, Tuple

from cg_tf.errors import UserInputError

MODELS = ('mlp', 'cnn')
INITS = ('paper', 'glorot_uniform')
DATASETS = ('mnist', 'fashion_mnist')
# 'fast' is the exact fast path by the compiled CPU kernel on CPUs and by XLA
# elsewhere (same bits); 'xla' and 'cpu_kernel' ask for one of the two.
WINSOR_IMPLS = ('fast', 'xla', 'cpu_kernel', 'reference')
# The names of aggregators.REGISTRY, here where flags are checked before TensorFlow loads.
AGGREGATORS = ('mean', 'winsorize', 'trimmed_mean', 'median', 'm3', 'rm3', 'ra3', 'l2clip', 'dp')
# §3.1's learning rate; a setting at another one is labelled with it.
PAPER_LEARNING_RATE = 0.1


@dataclasses.dataclass(frozen=True)
class Bounds:
  """An interval of allowed values: [lower, upper], each end open or closed, or unbounded."""
  lower: Optional[float] = None
  upper: Optional[float] = None
  lower_open: bool = False
  upper_open: bool = False

  def contains(self, value) -> bool:
    if self.lower is not None and (value <= self.lower if self.lower_open else value < self.lower):
      return False
    return self.upper is None or (value < self.upper if self.upper_open else value <= self.upper)

  def describe(self) -> str:
    """E.g. 'must be in [0, 50)', 'must be positive', 'must be >= 0'."""
    if self.upper is None:
      if self.lower == 0:
        return 'must be positive' if self.lower_open else 'must be >= 0'
      return f'must be {">" if self.lower_open else ">="} {self.lower:g}'
    return (f'must be in {"(" if self.lower_open else "["}{self.lower:g}, {self.upper:g}'
            f'{")" if self.upper_open else "]"}')


POSITIVE = Bounds(0, lower_open=True)
NON_NEGATIVE = Bounds(0)


def _setting(default, help_text: str, bounds: Optional[Bounds] = None, choices=None):
  return dataclasses.field(default=default, metadata={'help': help_text, 'bounds': bounds,
                                                      'choices': choices})


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that determines a run; two runs with equal configs are equal.

  Each field's metadata holds its help (what `python run.py --helpfull` shows
  for the flag of the same name), bounds and choices; `settings()` lists them.
  """
  dataset: str = _setting('mnist', 'Dataset, used when --data_dir is not given '
                          '(fashion_mnist through tfds).', choices=DATASETS)
  data_dir: Optional[str] = _setting(None, 'Directory with the four IDX files. If unset, MNIST '
                                     'is read from the copy shipped with cg_tf, other datasets '
                                     'through tfds.')
  train_size: int = _setting(0, 'Train on a fixed random subset of this many training examples '
                             '(0: all).', NON_NEGATIVE)
  noise: float = _setting(0.0, 'Fraction of training labels randomly permuted (§2.1).',
                          Bounds(0, 1))
  noise_seed: int = _setting(0, 'Seed of the label noise and the training subset.')
  seed: int = _setting(0, 'Seed of the initialisation and the minibatch order (and of the DP '
                       'noise).')
  model: str = _setting('mlp', "The network: 'mlp' (the paper's, widths --hidden) or 'cnn' "
                        '(Conv2D 32 3x3, max-pool 2, Conv2D 64 3x3, max-pool 2, Dense 128, '
                        'Dense 10, ReLU, on 28x28x1).', choices=MODELS)
  hidden: Tuple[int, ...] = _setting((2048,), 'Hidden layer widths of the MLP, e.g. 2048 or '
                                     '256,256,256.')
  init: str = _setting('paper', "'paper': N(0,1)*2/sqrt(fan_in+fan_out), as the authors' code; "
                       "or 'glorot_uniform'.", choices=INITS)
  learning_rate: float = _setting(0.1, 'Constant SGD learning rate.', POSITIVE)
  batch_size: int = _setting(100, 'Minibatch size; 0 for full-batch gradient descent.',
                             NON_NEGATIVE)
  steps: int = _setting(100_000, 'Number of training steps.', POSITIVE)
  eval_every: int = _setting(10_000, 'Evaluate every this many steps, besides the log-spaced '
                             'steps 0-9, 10-90, 100-900, 1000-9000.', POSITIVE)
  checkpoint_every: int = _setting(5_000, 'Checkpoint every this many steps.', POSITIVE)
  winsor_c: float = _setting(0.0, 'Winsorize per-example gradients at the c-th and (100-c)-th '
                             'percentile of the minibatch (§3); 0 is plain SGD.',
                             Bounds(0, 50, upper_open=True))
  winsor_impl: str = _setting('fast', "How winsorize, trimmed_mean and median sort: 'fast', "
                              'exact, by the compiled CPU kernel on CPUs (built once per '
                              "machine with g++) and by XLA elsewhere, the same numbers; 'xla' "
                              "or 'cpu_kernel': one of those two; 'reference' (winsorize): "
                              'vectorized_map and tfp.stats.percentile (slow, the definition).',
                              choices=WINSOR_IMPLS)
  deterministic: bool = _setting(False, 'Enable TensorFlow op determinism (GPU).')
  eval_batch_size: int = _setting(10_000, 'Examples per evaluation forward pass.', POSITIVE)
  decomp_every: int = _setting(0, 'Measure the §2.4 pristine/corrupt decomposition every this '
                               'many steps (0: off).', NON_NEGATIVE)
  decomp_dense_steps: int = _setting(10, '...and at every step up to this one.', NON_NEGATIVE)
  null_worlds: int = _setting(3, 'Null worlds (permuted designations) for §2.4.', NON_NEGATIVE)
  decomp_sample_examples: int = _setting(400, 'Examples in the sampled estimator.', POSITIVE)
  decomp_sample_weights: int = _setting(300, 'Weights per layer in the sampled estimator.',
                                        POSITIVE)
  coherence_every: int = _setting(0, 'Measure m-coherence, per-example coherence and GSNR over '
                                  'the whole training set every this many steps, and at the '
                                  "decomposition's dense and log-spaced steps (0: off).",
                                  NON_NEGATIVE)
  stiffness_examples: int = _setting(0, '...and the 10x10 class stiffness matrix on a fixed '
                                     'sample of this many training examples (0: off).',
                                     NON_NEGATIVE)
  forgetting: bool = _setting(False, "Count each example's forgetting events (correct at its "
                              'previous minibatch presentation, wrong at this one) into '
                              'examples.npz.')
  aggregator: str = _setting('winsorize', 'How per-example gradients become the update '
                             "(docs/aggregators.md); 'winsorize' with --winsor_c=0 is plain "
                             'SGD.', choices=AGGREGATORS)
  trim_k: int = _setting(0, 'trimmed_mean: values dropped a side per coordinate.',
                         NON_NEGATIVE)
  clip_norm: float = _setting(0.0, 'l2clip, dp: per-example gradient L2 norm bound C.',
                              NON_NEGATIVE)
  noise_multiplier: float = _setting(0.0, 'dp: Gaussian noise N(0, (sigma C)^2) on the clipped '
                                     'sum; sigma is this.', NON_NEGATIVE)
  dp_delta: float = _setting(1e-5, 'dp: the delta of the (epsilon, delta) reported.',
                             Bounds(0, 1, lower_open=True, upper_open=True))

  def __post_init__(self):
    object.__setattr__(self, 'hidden', tuple(int(h) for h in self.hidden))
    problems = [f'--{name}={spelled(getattr(self, name))} {problem}' for name, problem in
                ((f.name, check_setting(f.name, getattr(self, f.name)))
                 for f in dataclasses.fields(self)) if problem]
    if self.stiffness_examples and not self.coherence_every:
      problems.append(f'--stiffness_examples={self.stiffness_examples} is measured on the '
                      '--coherence_every schedule; set --coherence_every too')
    if self.model == 'cnn' and self.hidden != (2048,):
      problems.append(f'--hidden={spelled(self.hidden)} sets the widths of the MLP, but '
                      '--model=cnn; drop --hidden')
    if problems:
      raise UserInputError('; '.join(problems))
    # The aggregator checks its own settings, and that the others are unset.
    from cg_tf import aggregators  # pylint: disable=g-import-not-at-top
    aggregators.from_config(self)

  @classmethod
  def settings(cls):
    """[(name, type, default, help, bounds, choices)] of every setting, in field order."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], f.default, f.metadata['help'], f.metadata['bounds'],
             f.metadata['choices']) for f in dataclasses.fields(cls)]

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> 'Config':
    """The Config that to_json wrote.

    Raises:
      UserInputError: the text holds settings this version of cg_tf does not
        know (it was written by another version).
    """
    settings = json.loads(text)
    unknown = sorted(set(settings) - {field.name for field in dataclasses.fields(cls)})
    if unknown:
      raise UserInputError(f'the config holds settings this version of cg_tf does not know '
                           f'({", ".join(unknown)}): it was written by another version; '
                           'read it with that version')
    return cls(**settings)


_FIELDS = {field.name: field for field in dataclasses.fields(Config)}


def default(name: str):
  """The default of the setting `name`."""
  return _FIELDS[name].default


def check_setting(name: str, value) -> Optional[str]:
  """What is wrong with `value` for the setting `name` (e.g. 'must be in [0, 1]'), or None."""
  field = _FIELDS[name]
  choices, bounds = field.metadata['choices'], field.metadata['bounds']
  if choices is not None and value not in choices:
    return f'must be one of {", ".join(choices)}'
  if bounds is not None and not bounds.contains(value):
    return bounds.describe()
  if name == 'hidden' and (not value or any(h <= 0 for h in value)):
    return 'needs one or more positive widths, e.g. --hidden=2048 or --hidden=256,256,256'
  return None


def spelled(value) -> str:
  """A setting's value as a flag spells it: 0.5, 256,256,256."""
  if isinstance(value, tuple):
    return ','.join(map(str, value))
  return f'{value:g}' if isinstance(value, float) else str(value)
