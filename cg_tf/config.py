"""The frozen experiment configuration that the library takes instead of flags."""

import dataclasses
import json
from typing import Optional, Tuple

from cg_tf.errors import UserInputError

INITS = ('paper', 'glorot_uniform')
DATASETS = ('mnist', 'fashion_mnist')
# 'fast' is the exact fast path by the compiled CPU kernel on CPUs and by XLA
# elsewhere (same bits); 'xla' and 'cpu_kernel' ask for one of the two.
WINSOR_IMPLS = ('fast', 'xla', 'cpu_kernel', 'reference')
# The aggregators of cg_tf/aggregators.py, named here, where flags are checked
# before TensorFlow loads: those that need per-example gradients, and those
# that combine the last three minibatch gradients.
PER_EXAMPLE_AGGREGATORS = ('winsorize', 'trimmed_mean', 'median', 'l2clip', 'dp')
OVER_MINIBATCHES = ('m3', 'rm3', 'ra3')
AGGREGATORS = ('mean', *PER_EXAMPLE_AGGREGATORS, *OVER_MINIBATCHES)
# §3.1's learning rate; a setting at another one is labelled with it.
PAPER_LEARNING_RATE = 0.1


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that determines a run; two runs with equal configs are equal.

  Attributes:
    dataset: tfds name of the dataset ('mnist' or 'fashion_mnist').
    data_dir: directory with the four IDX files; None reads through tfds.
    train_size: train on a fixed random subset of this many examples; 0 = all.
    noise: fraction of training examples whose labels are permuted, in [0, 1].
    noise_seed: seed of the training subset and of the label noise.
    seed: seed of the initialisation and of the minibatch order.
    hidden: widths of the hidden ReLU layers.
    init: 'paper' (N(0,1) * 2 / sqrt(fan_in + fan_out)) or 'glorot_uniform'.
    learning_rate: constant SGD learning rate.
    batch_size: minibatch size; 0 means full-batch gradient descent.
    steps: number of SGD steps.
    eval_every: evaluate every this many steps, besides the log-spaced steps.
    checkpoint_every: checkpoint every this many steps (and at the end).
    winsor_c: winsorization percentile c in [0, 50); 0 is plain SGD.
    winsor_impl: how winsorize and trimmed_mean find each coordinate's
      extremes, and median its middle values: 'fast' (exact: the compiled
      CPU kernel on CPUs, XLA elsewhere; the same numbers), 'xla',
      'cpu_kernel', or 'reference' (winsorize only: vectorized_map and
      tfp.stats.percentile).
    deterministic: enable TensorFlow's op determinism (slower on GPU).
    eval_batch_size: examples per forward pass during evaluation.
    decomp_every: measure the §2.4 decomposition every this many steps; 0 = off.
    decomp_dense_steps: ...and at every step up to this one (Figure 3).
    null_worlds: number K of null worlds (permuted pristine/corrupt designations).
    decomp_sample_examples: examples in the paper's sampled estimator.
    decomp_sample_weights: kernel weights per layer in the sampled estimator.
    coherence_every: measure m-coherence, per-example coherence and GSNR over
      the whole training set every this many steps, at every step up to
      decomp_dense_steps and at the log-spaced steps (coherence.py); 0 = off.
    stiffness_examples: ...and the class stiffness matrix on a fixed sample of
      this many training examples; 0 = off.
    forgetting: count each example's forgetting events in the training step.
    aggregator: how per-example gradients become the update (aggregators.py):
      'winsorize' (with winsor_c; c = 0 is plain SGD), 'mean', 'trimmed_mean',
      'median', 'l2clip', 'dp', 'm3', 'rm3', 'ra3'.
    trim_k: trimmed_mean drops this many values a side per coordinate.
    clip_norm: l2clip and dp clip each example's gradient to this L2 norm.
    noise_multiplier: dp adds N(0, (noise_multiplier * clip_norm)^2) to the clipped sum.
    dp_delta: the delta of the (epsilon, delta) that a dp run reports.
  """
  dataset: str = 'mnist'
  data_dir: Optional[str] = None
  train_size: int = 0
  noise: float = 0.0
  noise_seed: int = 0
  seed: int = 0
  hidden: Tuple[int, ...] = (2048,)
  init: str = 'paper'
  learning_rate: float = 0.1
  batch_size: int = 100
  steps: int = 100_000
  eval_every: int = 10_000
  checkpoint_every: int = 5_000
  winsor_c: float = 0.0
  winsor_impl: str = 'fast'
  deterministic: bool = False
  eval_batch_size: int = 10_000
  decomp_every: int = 0
  decomp_dense_steps: int = 10
  null_worlds: int = 3
  decomp_sample_examples: int = 400
  decomp_sample_weights: int = 300
  coherence_every: int = 0
  stiffness_examples: int = 0
  forgetting: bool = False
  aggregator: str = 'winsorize'
  trim_k: int = 0
  clip_norm: float = 0.0
  noise_multiplier: float = 0.0
  dp_delta: float = 1e-5

  def __post_init__(self):
    object.__setattr__(self, 'hidden', tuple(int(h) for h in self.hidden))
    problems = []
    if not 0.0 <= self.noise <= 1.0:
      problems.append(f'--noise={self.noise} must be in [0, 1]')
    if not self.learning_rate > 0:
      problems.append(f'--learning_rate={self.learning_rate} must be positive')
    if self.steps <= 0:
      problems.append(f'--steps={self.steps} must be positive')
    if self.batch_size < 0:
      problems.append(f'--batch_size={self.batch_size} must be positive, or 0 for full batch')
    if self.train_size < 0:
      problems.append(f'--train_size={self.train_size} must be positive, or 0 for all')
    if self.eval_every <= 0:
      problems.append(f'--eval_every={self.eval_every} must be positive')
    if self.checkpoint_every <= 0:
      problems.append(f'--checkpoint_every={self.checkpoint_every} must be positive')
    if self.eval_batch_size <= 0:
      problems.append(f'--eval_batch_size={self.eval_batch_size} must be positive')
    if not self.hidden or any(h <= 0 for h in self.hidden):
      problems.append(f'--hidden={",".join(map(str, self.hidden))} needs one or more '
                      'positive widths, e.g. --hidden=2048 or --hidden=256,256,256')
    if self.init not in INITS:
      problems.append(f'--init={self.init} must be one of {", ".join(INITS)}')
    if self.dataset not in DATASETS:
      problems.append(f'--dataset={self.dataset} must be one of {", ".join(DATASETS)}')
    if not 0.0 <= self.winsor_c < 50.0:
      problems.append(f'--winsor_c={self.winsor_c} must be in [0, 50)')
    if self.winsor_impl not in WINSOR_IMPLS:
      problems.append(f'--winsor_impl={self.winsor_impl} must be one of {", ".join(WINSOR_IMPLS)}')
    for name in ('decomp_every', 'decomp_dense_steps', 'null_worlds', 'coherence_every',
                 'stiffness_examples'):
      if getattr(self, name) < 0:
        problems.append(f'--{name}={getattr(self, name)} must be >= 0')
    for name in ('decomp_sample_examples', 'decomp_sample_weights'):
      if getattr(self, name) <= 0:
        problems.append(f'--{name}={getattr(self, name)} must be positive')
    if self.stiffness_examples and not self.coherence_every:
      problems.append(f'--stiffness_examples={self.stiffness_examples} is measured on the '
                      '--coherence_every schedule; set --coherence_every too')
    if self.aggregator not in AGGREGATORS:
      problems.append(f'--aggregator={self.aggregator} must be one of {", ".join(AGGREGATORS)}')
    if self.winsor_c > 0 and self.aggregator != 'winsorize':
      problems.append(f'--winsor_c={self.winsor_c:g} winsorizes, but --aggregator='
                      f'{self.aggregator}; drop --winsor_c or use --aggregator=winsorize')
    if self.aggregator == 'trimmed_mean' and not (
        self.trim_k >= 1 and (self.batch_size == 0 or 2 * self.trim_k < self.batch_size)):
      problems.append(f'--aggregator=trimmed_mean needs 1 <= --trim_k < --batch_size / 2 '
                      f'(got --trim_k={self.trim_k}, --batch_size={self.batch_size})')
    if self.aggregator in ('l2clip', 'dp') and not self.clip_norm > 0:
      problems.append(f'--aggregator={self.aggregator} needs --clip_norm > 0')
    if self.noise_multiplier < 0:
      problems.append(f'--noise_multiplier={self.noise_multiplier} must be >= 0')
    if self.noise_multiplier > 0 and self.aggregator != 'dp':
      problems.append('--noise_multiplier adds noise for --aggregator=dp only')
    if not 0 < self.dp_delta < 1:
      problems.append(f'--dp_delta={self.dp_delta} must be in (0, 1)')
    if self.aggregator in PER_EXAMPLE_AGGREGATORS[1:] and self.batch_size == 0:
      problems.append(f'--aggregator={self.aggregator} needs a minibatch; set --batch_size')
    if self.winsor_impl == 'reference' and self.aggregator != 'winsorize':
      problems.append('--winsor_impl=reference is for --aggregator=winsorize')
    if self.winsor_c > 0 and self.batch_size == 0:
      problems.append('--winsor_c needs a minibatch: winsorizing the full batch would hold '
                      'every per-example gradient at once; set --batch_size')
    if problems:
      raise UserInputError('; '.join(problems))

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


def describe_aggregator(config: Config) -> str:
  """The aggregator and its own setting in words, e.g. 'trimmed_mean k=2', as tables show it."""
  rule = config.aggregator
  if rule == 'winsorize':
    text = 'mean (SGD)' if config.winsor_c == 0 else f'winsorize c={config.winsor_c:g}'
  else:
    text = {'trimmed_mean': f'trimmed_mean k={config.trim_k}',
            'l2clip': f'l2clip C={config.clip_norm:g}',
            'dp': f'dp C={config.clip_norm:g} σ={config.noise_multiplier:g}',
            'mean': 'mean (SGD)'}.get(rule, rule)
  if config.learning_rate != PAPER_LEARNING_RATE:
    text += f' lr={config.learning_rate:g}'
  return text


def step_cost_setting(config: Config) -> str:
  """describe_aggregator of the setting whose training step does the same work as `config`'s.

  The learning rate, the clip norm C and the noise multiplier σ change the
  numbers but not the work, so they are set to what analysis/bench_step.py
  times (lr 0.1, C = 1, σ = 1): 'l2clip C=10' costs what 'l2clip C=1' does.
  """
  clipping = config.aggregator in ('l2clip', 'dp')
  return describe_aggregator(dataclasses.replace(
      config, learning_rate=PAPER_LEARNING_RATE, clip_norm=1.0 if clipping else config.clip_norm,
      noise_multiplier=1.0 if config.aggregator == 'dp' else config.noise_multiplier))
