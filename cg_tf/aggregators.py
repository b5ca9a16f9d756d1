"""How a minibatch's per-example gradients become one update: one class per rule.

  aggregator = cg_tf.aggregators.get('winsorize', c=2)
  aggregator = cg_tf.aggregators.get('trimmed_mean', k=2)
  aggregator = cg_tf.aggregators.get('dp', clip_norm=1.0, noise_multiplier=1.1)

Every rule returns an update on the scale of the mean gradient of the
minibatch loss, so the same learning rate means the same step size as plain
SGD (g_e is the gradient of example e's own loss, B the batch size):
- mean: (1/B) sum_e g_e, plain SGD;
- winsorize (c): sum_e clip(g_e / B, l, u), l and u each coordinate's c-th
  and (100 - c)-th nearest-rank percentiles over the batch (paper §3); c = 0
  is plain SGD;
- trimmed_mean (k): per coordinate, the mean of the B - 2k values left after
  dropping the k largest and k smallest (Yin et al. 2018);
- median: the coordinate-wise median of the g_e;
- m3, rm3, ra3 (Zielinski, Krishnan & Chatterjee 2020): per coordinate, the
  median (m3, rm3) or mean (ra3) of the last 3 minibatch mean gradients; m3
  updates after every third minibatch from 3 fresh ones, rm3 and ra3 after
  every minibatch from the current and the two before, and none of them
  before the third minibatch (the authors' rm3.py);
- l2clip (C): (1/B) sum_e g_e min(1, C / ||g_e||), per-example L2 clipping;
- dp (C, sigma, delta): l2clip plus N(0, sigma^2 C^2) noise on the clipped
  sum (Abadi et al. 2016), drawn from a stateless seed of (seed, step), with
  the (epsilon, delta) of the steps taken as a metric.

An aggregator is given a `Minibatch` (what the step can compute about its
gradients, each formed only when asked) and returns one update per trainable
variable. Under a tf.distribute strategy every replica sees the whole global
minibatch; a rule splits its work by output columns over the replicas
(winsorize, trimmed_mean) or computes it whole on the first replica, with
zeros elsewhere, so that the optimizer's cross-replica sum is the one-device
update, bit for bit.

This module imports TensorFlow on first use only: `get` and the settings
checks run before TensorFlow loads, so that run.py refuses bad flags at once.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, ClassVar, Dict, List, Sequence, Type

from cg_tf import config as config_lib
from cg_tf.errors import UserInputError


class _Deferred:
  """A module imported when one of its attributes is first used."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attribute):
    return getattr(importlib.import_module(self._name), attribute)


tf = _Deferred('tensorflow')
keras = _Deferred('keras')
cpu_kernel = _Deferred('cg_tf.cpu_kernel')
distribute = _Deferred('cg_tf.distribute')
winsorize = _Deferred('cg_tf.winsorize')

# Seeds the DP noise apart from the minibatch shuffle, which also keys on the seed.
_NOISE_STREAM = 7


@dataclasses.dataclass
class Minibatch:
  """What an aggregator may ask about one minibatch's gradients.

  Attributes:
    variables: the model's trainable variables, in order.
    batch_size: B, static.
    step: int64 scalar tensor, the optimizer's step count before this update.
    mean_gradient: () -> [tensor per variable]: the gradient of the minibatch
      mean loss, as plain SGD takes it.
    per_example: () -> gradients.PerExampleGradients at the aggregator's
      `per_example_scale`: each example's gradient of the minibatch-mean loss
      ('mean': g_e / B), or of its own loss ('own': g_e).
    vectorized_map: () -> [tensor [B, *shape] per variable]: g_e over the
      whole model by tf.vectorized_map (the reference path).
  """
  variables: Sequence
  batch_size: int
  step: object
  mean_gradient: Callable[[], List]
  per_example: Callable[[], object]
  vectorized_map: Callable[[], List]


class Aggregator:
  """One rule for turning per-example gradients into an update.

  Subclasses set `name` and `settings` ({keyword: the Config field that holds
  it, whose metadata gives its type, bounds and help}), and implement
  `aggregate`. Settings are validated when the aggregator is made, in one line
  naming the keyword (or, from a Config, the flag).

  Attributes:
    name: the registry name.
    settings: {keyword of get(): Config field name}.
    per_example_scale: 'mean' (g_e / B) or 'own' (g_e), what `aggregate`
      expects Minibatch.per_example to give.
  """
  name: ClassVar[str]
  settings: ClassVar[Dict[str, str]] = {}
  per_example_scale: ClassVar[str] = 'mean'

  def __init__(self, **settings):
    self._set(settings, lambda keyword: f'{keyword}={settings.get(keyword)!r}')

  def _set(self, settings: Dict[str, object], spell: Callable[[str], str]) -> None:
    """Checks and keeps `settings`; `spell(keyword)` names a setting in messages."""
    unknown = sorted(set(settings) - set(self.settings))
    if unknown:
      known = ', '.join(self.settings) or 'none'
      raise UserInputError(f'{self.name} takes no setting {", ".join(unknown)} (its settings: '
                           f'{known})')
    self.values = {keyword: settings.get(keyword, config_lib.default(field))
                   for keyword, field in self.settings.items()}
    for keyword, field in self.settings.items():
      problem = config_lib.check_setting(field, self.values[keyword])
      if problem:
        raise UserInputError(f'{self.name}: {spell(keyword)} {problem}')
    self._check(spell)
    self._spell = spell
    self.backend = None
    self._metrics: Dict[str, object] = {}

  def _check(self, spell: Callable[[str], str]) -> None:
    """Checks that involve more than one setting's own bounds; `spell(keyword)` names a setting."""
    del spell

  def check_batch_size(self, batch_size: int) -> None:
    """Raises UserInputError if the rule cannot run on minibatches of `batch_size` (0: full batch)."""
    del batch_size

  @property
  def needs_per_example(self) -> bool:
    """True if `aggregate` asks for Minibatch.per_example (the step records the forward pass)."""
    return True

  def describe(self) -> str:
    """The rule and its settings in words, as tables show it, e.g. 'trimmed_mean k=2'."""
    return ' '.join([self.name, *(f'{k}={v:g}' for k, v in self.values.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool))])

  def build(self, variables: Sequence, on_cpus: bool) -> None:
    """Creates the rule's state and metrics; call under the strategy's scope, before any step.

    Args:
      variables: the model's trainable variables.
      on_cpus: every replica computes on a CPU (the order statistics may use
        the compiled CPU kernel).
    """
    del variables, on_cpus

  def aggregate(self, minibatch: Minibatch) -> List:
    """The update, one tensor per trainable variable; runs on every replica (see module doc)."""
    raise NotImplementedError

  @property
  def metrics(self) -> List:
    """Keras metrics the rule updates each step (e.g. the winsorized fraction)."""
    return list(self._metrics.values())

  def checkpointed(self) -> Dict[str, object]:
    """Trackables a checkpoint must hold for a resumed run to continue exactly."""
    return {}

  def evaluation_metrics(self, num_examples: int, batch_size: int, steps: int) -> Dict[str, float]:
    """Metrics of the run so far that are not measured on the model (e.g. dp/epsilon)."""
    del num_examples, batch_size, steps
    return {}


REGISTRY: Dict[str, Type[Aggregator]] = {}


def register(cls: Type[Aggregator]) -> Type[Aggregator]:
  """Adds an Aggregator subclass to REGISTRY under its `name` (a class decorator)."""
  REGISTRY[cls.name] = cls
  return cls


def get(name: str, **settings) -> Aggregator:
  """The aggregator `name` with `settings`, e.g. get('winsorize', c=2), get('median').

  Raises:
    UserInputError: an unknown name, an unknown setting or a value out of range.
  """
  if name not in REGISTRY:
    raise UserInputError(f'no aggregator {name!r}; the aggregators are {", ".join(REGISTRY)}')
  return REGISTRY[name](**settings)


def from_config(config) -> Aggregator:
  """The aggregator a Config names (config.aggregator and its settings), checked against it.

  Raises:
    UserInputError: a setting of another rule is set, or a value does not suit
      the rule or the batch size; the message names the flags.
  """
  cls = REGISTRY[config.aggregator]
  for field in sorted(AGGREGATOR_FIELDS - set(cls.settings.values())):
    value = getattr(config, field)
    if value != config_lib.default(field):
      owners = [c.name for c in REGISTRY.values() if field in c.settings.values()]
      raise UserInputError(f'--{field}={config_lib.spelled(value)} is a setting of --aggregator='
                           f'{"/".join(owners)}, but --aggregator={config.aggregator}; drop '
                           f'--{field} or use --aggregator={owners[0]}')
  aggregator = cls.__new__(cls)
  aggregator._set(  # pylint: disable=protected-access
      {keyword: getattr(config, field) for keyword, field in cls.settings.items()},
      lambda keyword: f'--{cls.settings[keyword]}='
                      f'{config_lib.spelled(getattr(config, cls.settings[keyword]))}')
  aggregator.check_batch_size(config.batch_size)
  return aggregator


def describe_run(config) -> str:
  """A run's rule and setting in words, as the aggregator tables label it, e.g.
  'trimmed_mean k=2' or 'mean (SGD) lr=0.01' (the learning rate when it is not §3.1's)."""
  text = from_config(config).describe()
  if config.learning_rate != config_lib.PAPER_LEARNING_RATE:
    text += f' lr={config.learning_rate:g}'
  return text


def step_cost_setting(config) -> str:
  """describe_run of the setting whose training step does the same work as `config`'s.

  The learning rate, the clip norm C and the noise multiplier σ change the
  numbers but not the work, so they are set to what analysis/bench_step.py
  times (lr 0.1, C = 1, σ = 1): 'l2clip C=10' costs what 'l2clip C=1' does.
  """
  clipping = config.aggregator in (L2Clip.name, DP.name)
  return describe_run(dataclasses.replace(
      config, learning_rate=config_lib.PAPER_LEARNING_RATE,
      clip_norm=1.0 if clipping else config.clip_norm,
      noise_multiplier=1.0 if config.aggregator == DP.name else config.noise_multiplier))


def _only_first_replica(updates: List) -> List:
  return [distribute.only_first_replica(u) for u in updates]


# ----------------------------------------------------------------------------
# The rules.


@register
class Mean(Aggregator):
  """Plain SGD: the minibatch mean gradient."""
  name = 'mean'

  @property
  def needs_per_example(self):
    return False

  def describe(self):
    return 'mean (SGD)'

  def aggregate(self, minibatch):
    return _only_first_replica(minibatch.mean_gradient())


class _OrderStatistics(Aggregator):
  """Rules that need, per coordinate, order statistics of the batch: their backend."""

  def build(self, variables, on_cpus):
    self.backend = winsorize.backend_for(self.values.get('impl', 'fast'), on_cpus)


@register
class Winsorize(_OrderStatistics):
  """Winsorized SGD (paper §3.1): per coordinate, clip the per-example gradients of the
  minibatch-mean loss to their c-th and (100 - c)-th nearest-rank percentiles, then sum.

  Settings: c in [0, 50) (0 is plain SGD); impl, how the percentiles are found:
  'fast' (the compiled CPU kernel on CPUs, XLA elsewhere, the same bits), 'xla',
  'cpu_kernel', or 'reference' (tf.vectorized_map and tfp.stats.percentile).
  Metric: train_batch/winsor_clipped_fraction, the share of per-example
  gradient entries that clipping changed.
  """
  name = 'winsorize'
  settings = {'c': 'winsor_c', 'impl': 'winsor_impl'}

  @property
  def c(self) -> float:
    return float(self.values['c'])

  @property
  def needs_per_example(self):
    return self.c > 0 and self.values['impl'] != 'reference'

  def describe(self):
    return 'mean (SGD)' if self.c == 0 else f'winsorize c={self.c:g}'

  def check_batch_size(self, batch_size):
    if self.c > 0 and batch_size == 0:
      raise UserInputError(f'{self._spell("c")} needs a minibatch: winsorizing the '
                           'full batch would hold every per-example gradient at once; set '
                           '--batch_size')

  def build(self, variables, on_cpus):
    if self.needs_per_example:
      super().build(variables, on_cpus)
    self.num_parameters = sum(int(v.shape.num_elements()) for v in variables)
    if self.needs_per_example:
      self._metrics['clipped'] = keras.metrics.Mean('train_batch/winsor_clipped_fraction')

  def aggregate(self, minibatch):
    if self.c == 0:
      return _only_first_replica(minibatch.mean_gradient())
    if self.values['impl'] == 'reference':
      # The loss is the minibatch mean, so example e contributes g_e / batch.
      return _only_first_replica([
          winsorize.winsorized_sum_reference(g / minibatch.batch_size, self.c)
          for g in minibatch.vectorized_map()])
    updates, num_clipped = [], tf.constant(0, tf.int64)
    for v in minibatch.per_example():
      if v.outer is not None:
        a, d = v.outer
        width = d.shape[-1]
        total, clipped = winsorize.winsorized_outer_sum_and_count(
            a, d, self.c, distribute.own_columns(width), self.backend)
        updates.append(tf.reshape(distribute.place_columns(total, width), v.shape))
      else:
        values = v.flat_values()
        width = values.shape[-1]
        total, clipped = winsorize.winsorized_sum_and_count(
            values, self.c, distribute.own_columns(width), self.backend)
        updates.append(v.scatter(tf.reshape(distribute.place_columns(total, width),
                                            v.values().shape[1:])))
      num_clipped += clipped
    num_clipped = distribute.sum_over_replicas(num_clipped)
    self._metrics['clipped'].update_state(
        tf.cast(num_clipped, tf.float32) / (self.num_parameters * minibatch.batch_size))
    return updates


@register
class TrimmedMean(_OrderStatistics):
  """Per coordinate, the mean of the B - 2k per-example gradients left after dropping the
  k largest and the k smallest (Yin et al. 2018). Settings: k >= 1, 2k < B; impl as winsorize
  ('fast', 'xla', 'cpu_kernel')."""
  name = 'trimmed_mean'
  settings = {'k': 'trim_k', 'impl': 'winsor_impl'}

  def _check(self, spell):
    if self.values['k'] < 1:
      raise UserInputError(f'trimmed_mean needs k >= 1 values dropped a side (got {spell("k")})')
    if self.values['impl'] == 'reference':
      raise UserInputError(f'{spell("impl")} is for winsorize; trimmed_mean takes fast, xla or '
                           'cpu_kernel')

  def check_batch_size(self, batch_size):
    if batch_size == 0 or 2 * self.values['k'] >= batch_size:
      raise UserInputError(f'trimmed_mean needs 1 <= k < batch size / 2 (got {self._spell("k")}, '
                           f'batch size {batch_size or "full"})')

  def aggregate(self, minibatch):
    k, batch = self.values['k'], minibatch.batch_size
    self.check_batch_size(batch)
    # Each example's values carry 1 / batch; the batch - 2k kept values are averaged.
    rescale = batch / (batch - 2 * k)
    updates = []
    for v in minibatch.per_example():
      if v.outer is not None:
        a, d = v.outer
        width = d.shape[-1]
        total = winsorize.trimmed_outer_sum(a, d, k, distribute.own_columns(width), self.backend)
        updates.append(tf.reshape(distribute.place_columns(total * rescale, width), v.shape))
      else:
        values = v.flat_values()
        width = values.shape[-1]
        total = winsorize.trimmed_sum(values, k, distribute.own_columns(width), self.backend)
        updates.append(v.scatter(tf.reshape(distribute.place_columns(total * rescale, width),
                                            v.values().shape[1:])))
    return updates


@register
class Median(_OrderStatistics):
  """The coordinate-wise median of the per-example gradients g_e (np.median's, the mean of
  the two middle values for an even batch). Setting: impl ('fast', 'xla', 'cpu_kernel')."""
  name = 'median'
  settings = {'impl': 'winsor_impl'}
  per_example_scale = 'own'

  def _check(self, spell):
    if self.values['impl'] == 'reference':
      raise UserInputError(f'{spell("impl")} is for winsorize; median takes fast, xla or '
                           'cpu_kernel')

  def describe(self):
    return 'median'

  def check_batch_size(self, batch_size):
    if batch_size == 0:
      raise UserInputError('the median needs a minibatch; set --batch_size')

  def aggregate(self, minibatch):
    updates = []
    for v in minibatch.per_example():
      if v.outer is not None:
        updates.append(tf.reshape(outer_median(*v.outer, self.backend), v.shape))
      else:
        # The values v are the outer products 1 * v: one row of ones.
        flat = v.flat_values()
        middle = outer_median(tf.ones([v.batch_size, 1]), flat, self.backend)
        updates.append(v.scatter(tf.reshape(middle, v.values().shape[1:])))
    return _only_first_replica(updates)


class _OverMinibatches(Aggregator):
  """m3, rm3, ra3: a rule over the last three minibatch mean gradients, kept as state."""

  @property
  def needs_per_example(self):
    return False

  def describe(self):
    return self.name

  def build(self, variables, on_cpus):
    # Every replica computes the same gradients, so the first replica's copy is kept.
    self.history = [
        tf.Variable(tf.zeros([3, *v.shape]), trainable=False, name=f'history_{i}',
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        for i, v in enumerate(variables)]

  def checkpointed(self):
    return {'gradient_history': self.history}

  def aggregate(self, minibatch):
    seen = minibatch.step + 1  # minibatches seen, this one included
    updates = []
    for g, history in zip(minibatch.mean_gradient(), self.history):
      # The first gradient fills the buffer, as in the authors' code; each next
      # one replaces the oldest.
      recorded = tf.where(seen == 1, tf.stack([g, g, g]), tf.tensor_scatter_nd_update(
          history, [[(seen - 1) % 3]], g[tf.newaxis]))
      history.assign(recorded)
      updates.append(over_minibatches(self.name, recorded, seen))
    return _only_first_replica(updates)


@register
class M3(_OverMinibatches):
  """Per coordinate, the median of three fresh minibatch gradients, every third minibatch."""
  name = 'm3'


@register
class RM3(_OverMinibatches):
  """Per coordinate, the median of this minibatch's gradient and the two before, every step."""
  name = 'rm3'


@register
class RA3(_OverMinibatches):
  """The mean of this minibatch's gradient and the two before, every step."""
  name = 'ra3'


@register
class L2Clip(Aggregator):
  """(1/B) sum_e g_e min(1, C / ||g_e||): each example's gradient clipped to L2 norm C.
  Setting: clip_norm C > 0."""
  name = 'l2clip'
  settings = {'clip_norm': 'clip_norm'}
  per_example_scale = 'own'

  def _check(self, spell):
    if not self.values['clip_norm'] > 0:
      raise UserInputError(f'{self.name} needs clip_norm > 0 (got {spell("clip_norm")})')

  def describe(self):
    return f'l2clip C={self.values["clip_norm"]:g}'

  def check_batch_size(self, batch_size):
    if batch_size == 0:
      raise UserInputError(f'{self.name} needs a minibatch; set --batch_size')

  def clipped_sums(self, minibatch) -> List:
    """sum_e g_e min(1, C / ||g_e||), one tensor per variable."""
    per_example = minibatch.per_example()
    return per_example.weighted_sums(clip_weights(per_example.squared_norms(),
                                                  self.values['clip_norm']))

  def aggregate(self, minibatch):
    return _only_first_replica([s / minibatch.batch_size for s in self.clipped_sums(minibatch)])


@register
class DP(L2Clip):
  """DP-SGD (Abadi et al. 2016): l2clip, plus N(0, (sigma C)^2) on the clipped sum, a function
  of (seed, step). Settings: clip_norm C > 0, noise_multiplier sigma >= 0, delta in (0, 1),
  seed. Metric at evaluation: dp/epsilon, the (epsilon, delta) of the steps so far."""
  name = 'dp'
  settings = {'clip_norm': 'clip_norm', 'noise_multiplier': 'noise_multiplier',
              'delta': 'dp_delta', 'seed': 'seed'}

  def describe(self):
    return f'dp C={self.values["clip_norm"]:g} σ={self.values["noise_multiplier"]:g}'

  def aggregate(self, minibatch):
    sums = self.clipped_sums(minibatch)
    noise = gaussian_noise([s.shape for s in sums],
                           self.values['noise_multiplier'] * self.values['clip_norm'],
                           self.values['seed'], minibatch.step)
    return _only_first_replica([(s + n) / minibatch.batch_size for s, n in zip(sums, noise)])

  def evaluation_metrics(self, num_examples, batch_size, steps):
    return {'dp/epsilon': dp_epsilon(num_examples, batch_size, steps,
                                     self.values['noise_multiplier'], self.values['delta'])}


# The Config fields that are some rule's setting.
AGGREGATOR_FIELDS = frozenset(f for cls in REGISTRY.values() for f in cls.settings.values()) - {
    'seed'}


# ----------------------------------------------------------------------------
# Building blocks.


def clip_weights(squared_norms, clip_norm: float):
  """min(1, C / ||g_e||) per example, float32 [B], from ||g_e||^2 [B]. clip_norm: C > 0."""
  norm = tf.sqrt(squared_norms)
  return tf.where(norm > clip_norm, clip_norm / tf.maximum(norm, 1e-30), tf.ones_like(norm))


def gaussian_noise(shapes: Sequence, stddev: float, seed: int, step) -> List:
  """N(0, stddev^2) per coordinate, one tensor per shape, a function of (seed, step) alone.

  A resumed run draws the same noise at the same step.
  """
  key = tf.constant([seed, _NOISE_STREAM], tf.int64)
  step = tf.cast(step, tf.int64)
  return [tf.random.stateless_normal(
      shape, seed=tf.random.experimental.stateless_fold_in(key, step * len(shapes) + i),
      stddev=stddev) for i, shape in enumerate(shapes)]


def outer_median(activations, deltas, backend: str = 'xla'):
  """Coordinate-wise median over e of outer(a_e, delta_e): [fan_in, fan_out], as np.median.

  Exact zeros decide most coordinates: where more than half of a row's
  activations (or of a column's errors) are 0, more than half of the
  coordinate's values are 0, and so is its median. With backend 'xla' only
  the other rows and columns are formed, [rows, columns, B], and sorted;
  with 'cpu_kernel' the compiled CPU kernel sorts them a vector of columns
  at a time (cpu_kernel.outer_middles), and the two middle values are
  averaged here as below, so both give the same numbers.
  """
  batch, fan_in = activations.shape
  fan_out = deltas.shape[1]
  if backend == 'cpu_kernel':
    lower, upper = cpu_kernel.outer_middles(activations, deltas)
    return upper if batch % 2 else (lower + upper) / 2
  # More than batch / 2 zeros <=> fewer than batch - batch // 2 nonzeros.
  needed = batch - batch // 2
  rows = tf.where(tf.math.count_nonzero(activations, axis=0) >= needed)[:, 0]
  cols = tf.where(tf.math.count_nonzero(deltas, axis=0) >= needed)[:, 0]
  values = median(tf.einsum('bi,bo->bio', tf.gather(activations, rows, axis=1),
                            tf.gather(deltas, cols, axis=1)))  # [rows, cols]
  # Every (row, column) pair formed; there may be none.
  pairs = tf.stack(tf.meshgrid(rows, cols, indexing='ij'), axis=-1)  # [rows, cols, 2]
  return tf.tensor_scatter_nd_update(tf.zeros([fan_in, fan_out], values.dtype),
                                     tf.reshape(pairs, [-1, 2]), tf.reshape(values, [-1]))


def median(per_example):
  """Coordinate-wise median over axis 0 of [B, ...] -> [...], as np.median."""
  per_example = tf.convert_to_tensor(per_example)
  batch = per_example.shape[0]
  ordered = tf.sort(tf.transpose(per_example, [*range(1, per_example.shape.rank), 0]), axis=-1)
  upper = ordered[..., batch // 2]
  if batch % 2:
    return upper
  return (ordered[..., batch // 2 - 1] + upper) / 2


def median_of_three(first, second, third):
  """Elementwise median of three tensors: their sum minus their minimum and maximum."""
  return (first + second + third - tf.minimum(tf.minimum(first, second), third)
          - tf.maximum(tf.maximum(first, second), third))


def over_minibatches(rule: str, history, seen):
  """The m3 / rm3 / ra3 update from the last three minibatch gradients.

  Args:
    rule: 'm3', 'rm3' or 'ra3'.
    history: [3, ...], the last three minibatch mean gradients (any order).
    seen: how many minibatch gradients have been seen, this one included.

  Returns:
    [...]: zeros when the rule makes no update after this minibatch.
  """
  if rule == 'ra3':
    update = tf.reduce_sum(history, axis=0) / 3
  else:
    update = median_of_three(history[0], history[1], history[2])
  due = seen >= 3
  if rule == 'm3':
    due = tf.logical_and(due, seen % 3 == 0)
  return tf.where(due, update, tf.zeros_like(update))


def dp_epsilon(num_examples: int, batch_size: int, steps: int, noise_multiplier: float,
               delta: float) -> float:
  """(epsilon, delta)-DP of `steps` DP-SGD steps, by the RDP accountant of `dp-accounting`.

  Treats each minibatch as Poisson-sampled with rate batch/num_examples, as
  TensorFlow Privacy's compute_dp_sgd_privacy does; the runs here draw fixed-
  size minibatches from a shuffle, for which this is the usual approximation.
  Infinite for noise_multiplier 0.
  """
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return float('inf')
  import dp_accounting  # pylint: disable=g-import-not-at-top
  accountant = dp_accounting.rdp.RdpAccountant()
  event = dp_accounting.PoissonSampledDpEvent(batch_size / num_examples,
                                              dp_accounting.GaussianDpEvent(noise_multiplier))
  accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
  return float(accountant.get_epsilon(delta))
