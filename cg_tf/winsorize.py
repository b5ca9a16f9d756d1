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
It streams over the examples under XLA, keeping the running extremes sorted:
for up to 5 a side by inserting one example at a time (a min/max insertion
network), for more by sorting a chunk of examples with Batcher's odd-even merge
sort and merging it into the running extremes, which takes fewer min/max
operations. A Dense layer's per-example gradient outer(a_e, delta_e) is formed
on the fly, so the [batch, fan_in, fan_out] tensor never exists. Both networks
only compare and move values, so they return the same bits, and ties need no
care. Measured against tf.math.top_k by analysis/bench_step.py (README).

On a CPU the same extremes come faster from a compiled kernel
(backend='cpu_kernel', cpu_kernel.py). Either way the winsorized or trimmed
sum is formed from the extremes by one function under XLA (_from_extremes),
so both backends return the same bits.
"""

import logging
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from cg_tf import cpu_kernel
from cg_tf.errors import UserInputError

log = logging.getLogger('cg_tf')

# How the fast path finds each coordinate's extremes: 'xla', the min/max network
# below (any device), or 'cpu_kernel' (cpu_kernel.py): the same bits, faster on a CPU.
BACKENDS = ('xla', 'cpu_kernel')

# Examples inserted per iteration of the in-XLA loop. Larger unrolls keep the
# running extremes in registers longer but compile slowly for large c (an
# unrolled batch of 100 at c = 8 took minutes to compile). Chunks of 5, 10 and
# 20 ran within 10% of each other in one-off measurements of a 784x256 layer
# on 2 CPU cores; analysis/bench_step.py measures the whole step.
CHUNK = 10
# From this many extremes a side, sorting chunks and merging beats insertion.
# In whole training steps (analysis/bench_step.py, batch 100, 2 CPU cores)
# merging made c = 8 (9 a side) 1.25x faster for 3x256 and 1.13x for 1x2048,
# and c = 4 (5 a side) no faster (1.04x faster and 1.06x slower); a lone 784x256
# layer ran c = 4 1.8x faster, so the gain depends on the layer shape.
MERGE_FROM = 6


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


def _compare(x, y, better, worse):
  """A comparator of a sorting network; None is a sentinel worse than any value."""
  if x is None:
    return y, None
  if y is None:
    return x, None
  return better(x, y), worse(x, y)


def _merge(x: Sequence, y: Sequence, better, worse) -> list:
  """Batcher's odd-even merge of two best-first lists, of any lengths.

  `better` and `worse` are tf.maximum and tf.minimum for descending order (or
  the reverse); entries may be None, a sentinel worse than any value. Outputs
  that the caller drops are pruned by XLA, so truncating the result to its
  first n costs only the comparators those n need.
  """
  if not x:
    return list(y)
  if not y:
    return list(x)
  if len(x) == 1 and len(y) == 1:
    return list(_compare(x[0], y[0], better, worse))
  even = _merge(x[0::2], y[0::2], better, worse)
  odd = _merge(x[1::2], y[1::2], better, worse)
  merged = [even[0]]
  for k, value in enumerate(odd):
    merged += _compare(value, even[k + 1], better, worse) if k + 1 < len(even) else [value]
  return merged + even[len(odd) + 1:]


def _sort(values: Sequence, better, worse) -> list:
  """Batcher's odd-even merge sort, best first."""
  if len(values) <= 1:
    return list(values)
  half = len(values) // 2
  return _merge(_sort(values[:half], better, worse), _sort(values[half:], better, worse), better,
                worse)


def _extremes(example: Callable[[tf.Tensor], tf.Tensor], batch: int, shape, num_largest: int,
              num_smallest: int) -> Tuple[Tuple[tf.Tensor, ...], Tuple[tf.Tensor, ...]]:
  """The `num_largest` largest and `num_smallest` smallest of example(0..batch-1), coordinatewise.

  Args:
    example: e (an int32 scalar tensor) -> that example's values, [*shape].
    batch: number of examples.
    shape: shape of one example's values.
    num_largest, num_smallest: how many extremes to keep a side (at most batch).

  Returns:
    (largest, descending; smallest, ascending): tuples of [*shape] tensors.
  """
  if max(num_largest, num_smallest) >= MERGE_FROM:
    return _extremes_by_merging(example, batch, shape, num_largest, num_smallest)
  return _extremes_by_insertion(example, batch, shape, num_largest, num_smallest)


def _extremes_by_insertion(example, batch, shape, num_largest, num_smallest):
  """_extremes, inserting one example at a time."""
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


def _extremes_by_merging(example, batch, shape, num_largest, num_smallest):
  """_extremes, sorting CHUNK examples at a time and merging them into the running extremes."""

  def merge_chunk(first, size, largest, smallest):
    descending = _sort([example(first + k) for k in range(size)], tf.maximum, tf.minimum)
    return (_merge(largest, descending, tf.maximum, tf.minimum)[:num_largest],
            _merge(smallest, descending[::-1], tf.minimum, tf.maximum)[:num_smallest])

  def filled(values, count, sentinel):
    values = list(values) + [None] * (count - len(values))
    return tuple(tf.fill(shape, sentinel) if v is None else v for v in values)

  # The first chunk needs no sentinels: it starts the running extremes.
  first_size = min(CHUNK, batch)
  largest, smallest = merge_chunk(tf.constant(0), first_size, [], [])
  largest, smallest = filled(largest, num_largest, -np.inf), filled(smallest, num_smallest, np.inf)

  def body(i, largest, smallest):
    largest, smallest = merge_chunk(first_size + i * CHUNK, CHUNK, largest, smallest)
    return i + 1, tuple(largest), tuple(smallest)

  num_chunks = (batch - first_size) // CHUNK
  if num_chunks:
    _, largest, smallest = tf.while_loop(lambda i, *_: i < num_chunks, body,
                                         (tf.constant(0), largest, smallest))
  rest = batch - first_size - num_chunks * CHUNK
  if rest:
    largest, smallest = merge_chunk(tf.constant(batch - rest), rest, largest, smallest)
  return tuple(largest), tuple(smallest)


def backend_for(winsor_impl: str, on_cpus: bool) -> str:
  """The backend that --winsor_impl names, for replicas that compute on CPUs or not.

  'fast' takes the CPU kernel on CPUs if it can be built and loaded, and
  otherwise XLA, logging why once; the two give the same bits.

  Raises:
    UserInputError: 'cpu_kernel' is asked for where it cannot run.
  """
  if winsor_impl == 'xla' or (winsor_impl == 'fast' and not on_cpus):
    return 'xla'
  if winsor_impl == 'cpu_kernel' and not on_cpus:
    raise UserInputError('--winsor_impl=cpu_kernel runs on CPUs, but this run computes on '
                         'GPUs or TPUs; use --winsor_impl=fast (XLA there)')
  reason = cpu_kernel.unavailable_reason()
  if reason is None:
    return 'cpu_kernel'
  if winsor_impl == 'cpu_kernel':
    raise UserInputError(f'--winsor_impl=cpu_kernel: the CPU kernel is not available ({reason}); '
                         'use --winsor_impl=xla (the same numbers, slower)')
  log.warning('winsorizing by XLA, not the compiled CPU kernel (the same numbers, slower): %s',
              reason)
  return 'xla'


def clipped_per_side(c: float, batch: int) -> Tuple[int, int]:
  """How many of a coordinate's `batch` values c-winsorization clips above and below."""
  low, high = nearest_ranks(c, batch)
  return batch - 1 - high, low


def _streaming_extremes(example: Callable[[tf.Tensor], tf.Tensor], batch: int, shape,
                        num_high: int, num_low: int, bounds: bool) -> cpu_kernel.Extremes:
  """What kernels/extremes.cc computes, by the XLA network (traced inside a jit function).

  Args:
    example: e (an int32 scalar tensor) -> that example's values, [*shape].
    batch: number of examples.
    shape: shape of one example's values.
    num_high, num_low: values a side to sum.
    bounds: also find the next value a side (winsorizing needs it, trimming does not).

  Returns:
    cpu_kernel.Extremes of [*shape] tensors; upper and lower are zeros when not
    `bounds`, and the count then is 0.
  """
  extra = 1 if bounds else 0
  largest, smallest = _extremes(example, batch, shape, num_high + extra, num_low + extra)
  zeros = tf.zeros(shape)

  def side(values, count, beyond):
    # Extremes that nothing uses are pruned by XLA, so unused parts cost nothing.
    if not count:
      return zeros, zeros, tf.constant(0, tf.int64)
    kept = tf.stack(values[:count])
    if not bounds:
      return tf.reduce_sum(kept, axis=0), zeros, tf.constant(0, tf.int64)
    bound = values[count]
    return tf.reduce_sum(kept, axis=0), bound, tf.math.count_nonzero(beyond(kept, bound))

  largest_sum, upper, high_clipped = side(largest, num_high, tf.greater)
  smallest_sum, lower, low_clipped = side(smallest, num_low, tf.less)
  return cpu_kernel.Extremes(largest_sum, upper, smallest_sum, lower, high_clipped + low_clipped)


def _from_extremes(total: tf.Tensor, extremes: cpu_kernel.Extremes, num_high: int, num_low: int,
                   trim: bool) -> tf.Tensor:
  """The winsorized (or, with `trim`, trimmed) sum from the plain sum and the extremes.

  For sorted values s_0 <= ... <= s_{B-1}, l = s_{num_low} and u = s_{B-1-num_high}:
    winsorized = total + (num_low l - sum_{i<num_low} s_i) - (sum_{i>B-1-num_high} s_i - num_high u)
    trimmed    = total - sum_{i<num_low} s_i - sum_{i>B-1-num_high} s_i.
  """
  if trim:
    return total - extremes.largest_sum - extremes.smallest_sum
  if num_high:
    total -= extremes.largest_sum - num_high * extremes.upper
  if num_low:
    total += num_low * extremes.lower - extremes.smallest_sum
  return total


def _outer_total(activations, deltas, columns):
  total = tf.matmul(activations, deltas, transpose_a=True)
  return total if columns is None else _own_columns(total, columns)


def _outer_value(activations, deltas):
  return lambda e: activations[e][:, tf.newaxis] * deltas[e][tf.newaxis, :]


@tf.function(jit_compile=True)
def _xla_outer(activations, deltas, num_high, num_low, trim, columns):
  total = _outer_total(activations, deltas, columns)
  if columns is not None:
    deltas = _own_columns(deltas, columns)
  extremes = _streaming_extremes(_outer_value(activations, deltas), activations.shape[0],
                                 [activations.shape[1], deltas.shape[1]], num_high, num_low,
                                 bounds=not trim)
  return _from_extremes(total, extremes, num_high, num_low, trim), extremes.num_clipped


@tf.function(jit_compile=True)
def _xla_sum(per_example, num_high, num_low, trim, columns):
  if columns is not None:
    per_example = _own_columns(per_example, columns)
  extremes = _streaming_extremes(lambda e: per_example[e], per_example.shape[0],
                                 per_example.shape[1:], num_high, num_low, bounds=not trim)
  return (_from_extremes(tf.reduce_sum(per_example, axis=0), extremes, num_high, num_low, trim),
          extremes.num_clipped)


# The CPU kernel's extremes are combined with the plain sum under XLA, as in
# _xla_outer and _xla_sum, so that both paths round alike.
@tf.function(jit_compile=True)
def _combine_outer(activations, deltas, columns, extremes, num_high, num_low, trim):
  return _from_extremes(_outer_total(activations, deltas, columns), extremes, num_high, num_low,
                        trim)


@tf.function(jit_compile=True)
def _combine_sum(per_example, extremes, num_high, num_low, trim):
  return _from_extremes(tf.reduce_sum(per_example, axis=0), extremes, num_high, num_low, trim)


def _uses_kernel(backend: str, num_high: int, num_low: int) -> bool:
  if backend not in BACKENDS:
    raise ValueError(f'backend must be one of {BACKENDS}, not {backend!r}')
  return backend == 'cpu_kernel' and max(num_high, num_low) <= cpu_kernel.MAX_CLIPPED


def _outer(activations, deltas, num_high, num_low, trim, columns, backend):
  """(winsorized or trimmed sum of outer(a_e, d_e) [fan_in, k], int64 count) by `backend`."""
  if not _uses_kernel(backend, num_high, num_low):
    return _xla_outer(activations, deltas, num_high, num_low, trim, columns)
  own = deltas if columns is None else _own_columns(deltas, columns)
  extremes = cpu_kernel.outer_extremes(activations, own, num_high, num_low)
  total = _combine_outer(activations, deltas, columns, extremes, num_high, num_low, trim)
  return total, tf.constant(0, tf.int64) if trim else extremes.num_clipped


def _sum(per_example, num_high, num_low, trim, columns, backend):
  """(winsorized or trimmed sum over axis 0 [...] or [k], int64 count) by `backend`."""
  if not _uses_kernel(backend, num_high, num_low):
    return _xla_sum(per_example, num_high, num_low, trim, columns)
  if columns is not None:
    per_example = _own_columns(per_example, columns)
  batch, shape = per_example.shape[0], per_example.shape[1:]
  # The values are 1 * v: a one-row outer product, which the kernel computes exactly.
  extremes = cpu_kernel.outer_extremes(tf.ones([batch, 1]), tf.reshape(per_example, [batch, -1]),
                                       num_high, num_low)
  extremes = cpu_kernel.Extremes(*(tf.reshape(x, shape) for x in extremes[:4]),
                                 extremes.num_clipped)
  total = _combine_sum(per_example, extremes, num_high, num_low, trim)
  return total, tf.constant(0, tf.int64) if trim else extremes.num_clipped


def winsorized_sum_and_count(per_example: tf.Tensor, c: float,
                             columns: Optional[tf.Tensor] = None,
                             backend: str = 'xla') -> Tuple[tf.Tensor, tf.Tensor]:
  """Fast exact winsorized sum over axis 0, and how many entries clipping changed.

  Args:
    per_example: [batch, ...] with a static batch size.
    c: percentile in [0, 50) (each value compiles once).
    columns: optionally int32 [k], for per_example [batch, width]: winsorize
      only these columns (-1: a padding column, result 0).
    backend: 'xla' (the min/max network, any device) or 'cpu_kernel' (the
      compiled CPU kernel, same bits; XLA beyond MAX_CLIPPED values a side).

  Returns:
    ([...] or [k] winsorized sum, int64 scalar count of entries strictly
    outside their coordinate's bounds; an entry equal to its bound is unchanged).
  """
  num_high, num_low = clipped_per_side(c, per_example.shape[0])
  return _sum(per_example, num_high, num_low, False, columns, backend)


def winsorized_outer_sum_and_count(activations: tf.Tensor, deltas: tf.Tensor, c: float,
                                   columns: Optional[tf.Tensor] = None,
                                   backend: str = 'xla') -> Tuple[tf.Tensor, tf.Tensor]:
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
    backend: as for winsorized_sum_and_count.

  Returns:
    ([fan_in, fan_out] or [fan_in, k] winsorized sum, int64 scalar count of
    clipped entries).
  """
  num_high, num_low = clipped_per_side(c, activations.shape[0])
  return _outer(activations, deltas, num_high, num_low, False, columns, backend)


def trimmed_sum(per_example: tf.Tensor, k: int, columns: Optional[tf.Tensor] = None,
                backend: str = 'xla') -> tf.Tensor:
  """Sum over axis 0 without each coordinate's k largest and k smallest values (k >= 1).

  For sorted values s_0 <= ... <= s_{B-1} of a coordinate, sum_{i=k}^{B-1-k} s_i:
  the coordinate-wise trimmed mean times B - 2k (Yin et al. 2018).

  Args:
    per_example: [batch, ...] with a static batch size > 2k.
    k: values dropped a side (each value compiles once).
    columns, backend: as for winsorized_sum_and_count.

  Returns:
    [...] or [k_columns].
  """
  return _sum(per_example, k, k, True, columns, backend)[0]


def trimmed_outer_sum(activations: tf.Tensor, deltas: tf.Tensor, k: int,
                      columns: Optional[tf.Tensor] = None, backend: str = 'xla') -> tf.Tensor:
  """trimmed_sum over e of outer(activations[e], deltas[e]), never materialised.

  Args:
    activations: [batch, fan_in].
    deltas: [batch, fan_out].
    k: values dropped a side.
    columns, backend: as for winsorized_outer_sum_and_count.

  Returns:
    [fan_in, fan_out] or [fan_in, k_columns].
  """
  return _outer(activations, deltas, k, k, True, columns, backend)[0]


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
