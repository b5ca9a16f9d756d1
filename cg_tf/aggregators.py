"""How a minibatch's per-example gradients become one update: robust aggregators and DP-SGD.

Every aggregator returns an update on the scale of the mean gradient, so the
same learning rate means the same step size for plain SGD:
- mean: (1/B) sum_e g_e, plain SGD;
- winsorize (c): (1/B) sum_e clip(g_e, l, u), winsorize.py (paper §3);
- trimmed_mean (k): per coordinate, the mean of the B - 2k values left after
  dropping the k largest and k smallest (Yin et al. 2018);
- median: the coordinate-wise median of the B per-example gradients;
- m3, rm3, ra3 (Zielinski, Krishnan & Chatterjee 2020): per coordinate, the
  median (m3, rm3) or mean (ra3) of the last 3 minibatch mean gradients;
  m3 updates after every third minibatch from 3 fresh ones, rm3 and ra3
  after every minibatch from the current and the two before, and none of
  them before the third minibatch (the authors' rm3.py);
- l2clip (C): (1/B) sum_e g_e min(1, C / ||g_e||), per-example L2 clipping;
- dp (C, sigma): l2clip plus N(0, sigma^2 C^2) noise on the clipped sum
  (Abadi et al. 2016), drawn from a stateless seed of (seed, step).

For a Dense layer with input a_e and error delta_e, ||g_e||^2 over all layers
is sum (||a_e||^2 + 1) ||delta_e||^2 and the clipped sum is A^T diag(w) Delta,
so no per-example gradient tensor is formed (the "ghost norm" trick).
"""

from typing import List, Sequence, Tuple

import tensorflow as tf

from cg_tf import cpu_kernel

# Seeds the DP noise apart from the minibatch shuffle, which also keys on config.seed.
_NOISE_STREAM = 7


def clip_weights(factors: Sequence[Tuple[tf.Tensor, tf.Tensor]], clip_norm: float) -> tf.Tensor:
  """min(1, C / ||g_e||) for every example, from Dense factors: float32 [B].

  Args:
    factors: per Dense layer, (a [B, fan_in], delta [B, fan_out]), delta the
      error of example e's own loss (not divided by B).
    clip_norm: C > 0.
  """
  squared = tf.add_n([(tf.reduce_sum(a * a, axis=1) + 1.0) * tf.reduce_sum(d * d, axis=1)
                      for a, d in factors])
  norm = tf.sqrt(squared)
  return tf.where(norm > clip_norm, clip_norm / tf.maximum(norm, 1e-30), tf.ones_like(norm))


def clipped_sums(factors: Sequence[Tuple[tf.Tensor, tf.Tensor]],
                 clip_norm: float) -> List[tf.Tensor]:
  """sum_e g_e min(1, C / ||g_e||): per layer, kernel [fan_in, fan_out] then bias [fan_out]."""
  weights = clip_weights(factors, clip_norm)[:, tf.newaxis]
  sums = []
  for a, delta in factors:
    sums += [tf.matmul(a, delta * weights, transpose_a=True),
             tf.reduce_sum(delta * weights, axis=0)]
  return sums


def gaussian_noise(shapes: Sequence[tf.TensorShape], stddev: float, seed: int,
                   step: tf.Tensor) -> List[tf.Tensor]:
  """N(0, stddev^2) per coordinate, one tensor per shape, a function of (seed, step) alone.

  A resumed run draws the same noise at the same step.
  """
  key = tf.constant([seed, _NOISE_STREAM], tf.int64)
  step = tf.cast(step, tf.int64)
  return [tf.random.stateless_normal(
      shape, seed=tf.random.experimental.stateless_fold_in(key, step * len(shapes) + i),
      stddev=stddev) for i, shape in enumerate(shapes)]


def outer_median(activations: tf.Tensor, deltas: tf.Tensor, backend: str = 'xla') -> tf.Tensor:
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


def median(per_example: tf.Tensor) -> tf.Tensor:
  """Coordinate-wise median over axis 0 of [B, ...] -> [...], as np.median."""
  per_example = tf.convert_to_tensor(per_example)
  batch = per_example.shape[0]
  ordered = tf.sort(tf.transpose(per_example, [*range(1, per_example.shape.rank), 0]), axis=-1)
  upper = ordered[..., batch // 2]
  if batch % 2:
    return upper
  return (ordered[..., batch // 2 - 1] + upper) / 2


def median_of_three(first: tf.Tensor, second: tf.Tensor, third: tf.Tensor) -> tf.Tensor:
  """Elementwise median of three tensors: their sum minus their minimum and maximum."""
  return (first + second + third - tf.minimum(tf.minimum(first, second), third)
          - tf.maximum(tf.maximum(first, second), third))


def over_minibatches(rule: str, history: tf.Tensor, seen: tf.Tensor) -> tf.Tensor:
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

