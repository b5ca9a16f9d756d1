"""Winsorized sums of per-example gradients (paper §3.1).

For each coordinate, l is the c-th and u the (100 - c)-th nearest-rank
percentile of its values across the batch, and the winsorized sum is
sum_e clip(g_e, l, u). Nearest rank means what tfp.stats.percentile and
np.percentile call 'nearest': the value at sorted position round(q/100 *
(batch - 1)), rounding half to even, so that c = 2 with a batch of 100 clips
exactly the two lowest and the two highest values.

`winsorized_sum_reference` is the definition, via tfp.stats.percentile.
`winsorized_sum` is the fast exact path: only the k smallest and largest values
matter, found with tf.math.top_k instead of a sort, and
sum_e clip(g_e, l, u) = sum_e g_e + sum_{i<k_low} (l - s_i) - sum_{i>k_high} (s_i - u)
for sorted values s. Ties need no care: the identity holds rank by rank.
"""

from typing import Tuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp


def nearest_ranks(c: float, batch: int) -> Tuple[int, int]:
  """Sorted positions (0-based) of the c-th and (100 - c)-th nearest-rank percentiles.

  Matches tfp.stats.percentile(interpolation='nearest') and np.percentile(
  method='nearest'); both round half to even, as np.round does.
  """
  low = int(np.round(c / 100.0 * (batch - 1)))
  high = int(np.round((100.0 - c) / 100.0 * (batch - 1)))
  return low, high


def winsorized_sum_reference(per_example: tf.Tensor, c: float) -> tf.Tensor:
  """The definition, by tfp.stats.percentile. [batch, ...] -> [...]."""
  if c == 0:
    return tf.reduce_sum(per_example, axis=0)
  bounds = tfp.stats.percentile(per_example, [c, 100.0 - c], axis=0, interpolation='nearest',
                                keepdims=False)
  return tf.reduce_sum(tf.clip_by_value(per_example, bounds[0], bounds[1]), axis=0)


def winsorized_sum_last_axis(values: tf.Tensor, c: float) -> Tuple[tf.Tensor, tf.Tensor]:
  """Fast exact winsorized sum over the last axis.

  Args:
    values: [..., batch]; the batch axis is last because top_k works there.
    c: percentile in [0, 50).

  Returns:
    (winsorized sum [...], number of entries that clipping changed, an int64
    scalar). An entry equal to its bound counts as unchanged.
  """
  batch = values.shape[-1]
  total = tf.reduce_sum(values, axis=-1)
  low, high = nearest_ranks(c, batch)
  num_high = batch - 1 - high
  num_clipped = tf.constant(0, tf.int64)
  if num_high > 0:
    largest = tf.math.top_k(values, num_high + 1, sorted=True).values
    upper = largest[..., num_high]
    above = largest[..., :num_high]
    total -= tf.reduce_sum(above, axis=-1) - num_high * upper
    num_clipped += tf.math.count_nonzero(above > upper[..., tf.newaxis])
  if low > 0:
    smallest = -tf.math.top_k(-values, low + 1, sorted=True).values
    lower = smallest[..., low]
    below = smallest[..., :low]
    total += low * lower - tf.reduce_sum(below, axis=-1)
    num_clipped += tf.math.count_nonzero(below < lower[..., tf.newaxis])
  return total, num_clipped


def winsorized_sum(per_example: tf.Tensor, c: float) -> tf.Tensor:
  """c-winsorized sum over the batch, fast and exact.

  Args:
    per_example: [batch, ...] values, e.g. per-example gradients of one variable.
    c: percentile in [0, 50); 0 is the plain sum.

  Returns:
    [...]: sum_e clip(per_example[e], l, u), l and u the c-th and (100 - c)-th
    nearest-rank percentiles over the batch, coordinate by coordinate.
  """
  if c == 0:
    return tf.reduce_sum(per_example, axis=0)
  rank = len(per_example.shape)
  batch_last = tf.transpose(per_example, list(range(1, rank)) + [0])
  return winsorized_sum_last_axis(batch_last, c)[0]
