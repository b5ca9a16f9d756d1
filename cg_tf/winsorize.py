"""Winsorized and trimmed sums of per-example gradients (paper §3.1; Yin et al. 2018).

For each coordinate, l is the c-th and u the (100 - c)-th nearest-rank
percentile of its values across the batch, and the winsorized sum is
sum_e clip(g_e, l, u). Nearest rank means what tfp.stats.percentile and
np.percentile call 'nearest': the value at sorted position round(q/100 *
(batch - 1)), rounding half to even, so that c = 2 with a batch of 100 clips
exactly the two lowest and the two highest values.

`winsorized_sum_reference` is the definition, via tfp.stats.percentile: it
sorts every coordinate's batch. The fast exact path needs only the k_high + 1
largest and k_low + 1 smallest values of each coordinate (k = how many are
clipped on that side), because for sorted values s_0 <= ... <= s_{B-1},
  sum_e clip(g_e, l, u) = sum_e g_e + sum_{i<k_low} (l - s_i) - sum_{i>B-1-k_high} (s_i - u).
It keeps them in registers with a min/max insertion network, streaming over the
examples under XLA; a Dense layer's per-example gradient outer(a_e, delta_e)
is formed on the fly, so the [batch, fan_in, fan_out] tensor never exists. The
network treats values as a multiset, so ties need no care. Measured against
tf.math.top_k by analysis/bench_step.py (README).
"""

from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

# Examples inserted per iteration of the in-XLA loop. Larger unrolls keep the
# running extremes in registers longer but compile slowly for large c (an
# unrolled batch of 100 at c = 8 took minutes to compile). Chunks of 5, 10 and
# 20 ran within 10% of each other in one-off measurements of a 784x256 layer
# on 2 CPU cores; analysis/bench_step.py measures the whole step.
CHUNK = 10


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


def _insert(largest: Sequence[tf.Tensor], smallest: Sequence[tf.Tensor], x: tf.Tensor):
  """Inserts x into descending `largest` and ascending `smallest` (both kept sorted)."""
  largest, smallest = list(largest), list(smallest)
  carry = x
  for j, level in enumerate(largest):
    largest[j], carry = tf.maximum(level, carry), tf.minimum(level, carry)
  carry = x
  for j, level in enumerate(smallest):
    smallest[j], carry = tf.minimum(level, carry), tf.maximum(level, carry)
  return tuple(largest), tuple(smallest)


def _extremes(example: Callable[[tf.Tensor], tf.Tensor], batch: int, shape, num_largest: int,
              num_smallest: int) -> Tuple[Tuple[tf.Tensor, ...], Tuple[tf.Tensor, ...]]:
  """The `num_largest` largest and `num_smallest` smallest of example(0..batch-1), coordinatewise.

  Args:
    example: e (an int32 scalar tensor) -> that example's values, [*shape].
    batch: number of examples.
    shape: shape of one example's values.
    num_largest, num_smallest: how many extremes to keep a side.

  Returns:
    (largest, descending; smallest, ascending): tuples of [*shape] tensors.
  """
  largest = tuple(tf.fill(shape, -np.inf) for _ in range(num_largest))
  smallest = tuple(tf.fill(shape, np.inf) for _ in range(num_smallest))

  def insert_chunk(first, largest, smallest, size):
    for k in range(size):
      largest, smallest = _insert(largest, smallest, example(first + k))
    return largest, smallest

  def body(i, largest, smallest):
    return (i + 1, *insert_chunk(i * CHUNK, largest, smallest, CHUNK))

  num_chunks = batch // CHUNK
  _, largest, smallest = tf.while_loop(lambda i, *_: i < num_chunks, body,
                                       (tf.constant(0), largest, smallest))
  return insert_chunk(tf.constant(num_chunks * CHUNK), largest, smallest, batch % CHUNK)


def _winsorize_streaming(example: Callable[[tf.Tensor], tf.Tensor], batch: int, shape,
                         total: tf.Tensor, c: float) -> Tuple[tf.Tensor, tf.Tensor]:
  """Winsorized sum of example(0), ..., example(batch - 1), each of `shape`.

  Args:
    example: e (an int32 scalar tensor) -> that example's values, [*shape].
    batch: number of examples.
    shape: shape of one example's values.
    total: [*shape], the plain sum (computed by the caller the cheapest way).
    c: percentile.

  Returns:
    (winsorized sum [*shape], int64 count of entries strictly outside their bounds).
  """
  low, high = nearest_ranks(c, batch)
  num_high = batch - 1 - high
  largest, smallest = _extremes(example, batch, shape, num_high + 1, low + 1)
  upper, lower = largest[num_high], smallest[low]
  num_clipped = tf.constant(0, tf.int64)
  if num_high:
    above = tf.stack(largest[:num_high])
    total -= tf.reduce_sum(above, axis=0) - num_high * upper
    num_clipped += tf.math.count_nonzero(above > upper)
  if low:
    below = tf.stack(smallest[:low])
    total += low * lower - tf.reduce_sum(below, axis=0)
    num_clipped += tf.math.count_nonzero(below < lower)
  return total, num_clipped


def _trim_streaming(example: Callable[[tf.Tensor], tf.Tensor], batch: int, shape,
                    total: tf.Tensor, k: int) -> tf.Tensor:
  """Sum of example(0..batch-1) without each coordinate's k largest and k smallest values."""
  largest, smallest = _extremes(example, batch, shape, k, k)
  return total - tf.reduce_sum(tf.stack(largest), axis=0) - tf.reduce_sum(tf.stack(smallest),
                                                                           axis=0)


@tf.function(jit_compile=True)
def winsorized_sum_and_count(per_example: tf.Tensor, c: float,
                             columns: Optional[tf.Tensor] = None) -> Tuple[tf.Tensor, tf.Tensor]:
  """Fast exact winsorized sum over axis 0, and how many entries clipping changed.

  Args:
    per_example: [batch, ...] with a static batch size.
    c: percentile in [0, 50) (a Python number: each value compiles once).
    columns: optionally int32 [k], for per_example [batch, width]: winsorize
      only these columns (-1: a padding column, result 0).

  Returns:
    ([...] or [k] winsorized sum, int64 scalar count of entries strictly
    outside their coordinate's bounds; an entry equal to its bound is unchanged).
  """
  if columns is not None:
    per_example = _own_columns(per_example, columns)
  return _winsorize_streaming(lambda e: per_example[e], per_example.shape[0],
                              per_example.shape[1:], tf.reduce_sum(per_example, axis=0), c)


@tf.function(jit_compile=True)
def winsorized_outer_sum_and_count(activations: tf.Tensor, deltas: tf.Tensor, c: float,
                                   columns: Optional[tf.Tensor] = None
                                   ) -> Tuple[tf.Tensor, tf.Tensor]:
  """Winsorized sum over e of outer(activations[e], deltas[e]), never materialised.

  This is a Dense kernel's winsorized gradient: example e's kernel gradient is
  the outer product of the layer's input a_e and its back-propagated error.

  Args:
    activations: [batch, fan_in].
    deltas: [batch, fan_out].
    c: percentile in [0, 50).
    columns: optionally int32 [k], the output columns to winsorize (one
      replica's block); -1 marks a padding column, whose result is 0. Every
      returned entry has the bits it has when all columns are winsorized.

  Returns:
    ([fan_in, fan_out] or [fan_in, k] winsorized sum, int64 scalar count of
    clipped entries).
  """
  total = tf.matmul(activations, deltas, transpose_a=True)
  if columns is not None:
    total, deltas = (_own_columns(x, columns) for x in (total, deltas))
  return _winsorize_streaming(
      lambda e: activations[e][:, tf.newaxis] * deltas[e][tf.newaxis, :],
      activations.shape[0], [activations.shape[1], deltas.shape[1]], total, c)


@tf.function(jit_compile=True)
def trimmed_sum(per_example: tf.Tensor, k: int, columns: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Sum over axis 0 without each coordinate's k largest and k smallest values (k >= 1).

  For sorted values s_0 <= ... <= s_{B-1} of a coordinate, sum_{i=k}^{B-1-k} s_i:
  the coordinate-wise trimmed mean times B - 2k (Yin et al. 2018).

  Args:
    per_example: [batch, ...] with a static batch size > 2k.
    k: values dropped a side (a Python int: each value compiles once).
    columns: as for winsorized_sum_and_count.

  Returns:
    [...] or [k_columns].
  """
  if columns is not None:
    per_example = _own_columns(per_example, columns)
  return _trim_streaming(lambda e: per_example[e], per_example.shape[0], per_example.shape[1:],
                         tf.reduce_sum(per_example, axis=0), k)


@tf.function(jit_compile=True)
def trimmed_outer_sum(activations: tf.Tensor, deltas: tf.Tensor, k: int,
                      columns: Optional[tf.Tensor] = None) -> tf.Tensor:
  """trimmed_sum over e of outer(activations[e], deltas[e]), never materialised.

  Args:
    activations: [batch, fan_in].
    deltas: [batch, fan_out].
    k: values dropped a side.
    columns: as for winsorized_outer_sum_and_count.

  Returns:
    [fan_in, fan_out] or [fan_in, k_columns].
  """
  total = tf.matmul(activations, deltas, transpose_a=True)
  if columns is not None:
    total, deltas = (_own_columns(x, columns) for x in (total, deltas))
  return _trim_streaming(lambda e: activations[e][:, tf.newaxis] * deltas[e][tf.newaxis, :],
                         activations.shape[0], [activations.shape[1], deltas.shape[1]], total, k)


def _own_columns(values: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
  """values[:, columns], with zeros where a column is -1. [n, width] -> [n, k]."""
  picked = tf.gather(values, tf.maximum(columns, 0), axis=1)
  return tf.where(columns >= 0, picked, tf.zeros_like(picked))


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
  return winsorized_sum_and_count(per_example, float(c))[0]
