"""Winsorized sums against np.percentile(method='nearest') in float64."""

import itertools

from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from analysis import bench_step
from cg_tf import winsorize
from tests import reference


def fresh_values(kind, batch, shape, seed):
  rng = np.random.default_rng(seed)
  size = (batch, *shape)
  if kind == 'normal':
    return rng.normal(size=size).astype(np.float32)
  if kind == 'ties':  # few distinct values: many ties at the percentile ranks
    return rng.integers(-2, 3, size).astype(np.float32)
  if kind == 'sparse':  # mostly zeros, like gradients of dead ReLUs
    return (rng.normal(size=size) * (rng.random(size) < 0.1)).astype(np.float32)
  if kind == 'constant':
    return np.full(size, 0.25, np.float32)
  raise ValueError(kind)


class WinsorizeTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.product(c=[0, 0.5, 1, 2, 4, 8, 25, 49.5], batch=[1, 2, 3, 7, 100],
                         kind=['normal', 'ties', 'sparse', 'constant'])
  def test_fast_and_reference_match_numpy(self, c, batch, kind):
    values = fresh_values(kind, batch, (5, 3), seed=int(c * 10) + batch)
    expected = reference.winsorized_sum(values, c)
    self.assertAllClose(winsorize.winsorized_sum(tf.constant(values), c), expected,
                        rtol=1e-5, atol=1e-5)
    self.assertAllClose(winsorize.winsorized_sum_reference(tf.constant(values), c), expected,
                        rtol=1e-5, atol=1e-5)
    if c:
      by_kernel, _ = winsorize.winsorized_sum_and_count(tf.constant(values), c,
                                                        backend='cpu_kernel')
      self.assertAllClose(by_kernel, expected, rtol=1e-5, atol=1e-5)

  @parameterized.product(c=[1, 2, 4, 8], kind=['normal', 'ties', 'sparse'],
                         backend=winsorize.BACKENDS)
  def test_clipped_count(self, c, kind, backend):
    values = fresh_values(kind, 100, (40,), seed=c)
    _, num_clipped = winsorize.winsorized_sum_and_count(tf.constant(values), float(c),
                                                        backend=backend)
    self.assertEqual(int(num_clipped), reference.num_clipped(values, c))

  @parameterized.product(c=[1, 2, 8, 30], batch=[1, 9, 10, 23, 100], kind=['normal', 'ties'],
                         backend=winsorize.BACKENDS)
  def test_outer_products_match_numpy(self, c, batch, kind, backend):
    rng = np.random.default_rng(batch + c)
    activations = np.maximum(fresh_values(kind, batch, (6,), c), 0)  # ReLU outputs
    activations[rng.random(activations.shape) < 0.3] = 0  # and dead units
    deltas = fresh_values(kind, batch, (4,), c + 1)
    per_example = np.einsum('bi,bo->bio', activations, deltas)
    total, num_clipped = winsorize.winsorized_outer_sum_and_count(
        tf.constant(activations), tf.constant(deltas), float(c), backend=backend)
    self.assertAllClose(total, reference.winsorized_sum(per_example, c), rtol=1e-5, atol=1e-5)
    self.assertEqual(int(num_clipped), reference.num_clipped(per_example, c))

  def test_batch_of_100_clips_exactly_c_each_side(self):
    values = np.random.default_rng(0).permutation(100).astype(np.float32)[:, None]
    # c = 2: the two lowest (0, 1) become 2, the two highest (98, 99) become 97.
    expected = values.sum() + (2 - 0) + (2 - 1) - (98 - 97) - (99 - 97)
    self.assertAllClose(winsorize.winsorized_sum(tf.constant(values), 2), [expected])

  def test_c_zero_is_plain_sum(self):
    values = fresh_values('normal', 10, (4,), 1)
    self.assertAllEqual(winsorize.winsorized_sum(tf.constant(values), 0),
                        tf.reduce_sum(values, axis=0))

  @parameterized.product(batch=[1, 2, 3, 4, 5, 7, 10, 33, 100], c=[0.5, 1, 2.5, 10, 12.5, 25,
                                                                   37.5, 45])
  def test_nearest_ranks_match_tfp(self, batch, c):
    ranks = tf.range(batch, dtype=tf.float32)
    low, high = tfp.stats.percentile(ranks, [c, 100 - c], interpolation='nearest').numpy()
    self.assertEqual(winsorize.nearest_ranks(c, batch), (int(low), int(high)))


@pytest.mark.slow
class NetworkTest(parameterized.TestCase, tf.test.TestCase):
  """The sorting and merging networks of the fast path (winsorize._sort, _merge)."""

  def test_sort_sorts_every_zero_one_input(self):
    # The 0-1 principle: a comparator network that sorts every 0/1 input sorts every input.
    for size in range(1, 13):
      for bits in itertools.product((0, 1), repeat=size):
        self.assertEqual(winsorize._sort(list(bits), max, min), sorted(bits, reverse=True))

  def test_merge_merges_every_zero_one_pair_of_any_lengths(self):
    for size_x, size_y in itertools.product(range(11), repeat=2):
      for ones_x, ones_y in itertools.product(range(size_x + 1), range(size_y + 1)):
        x = [1] * ones_x + [0] * (size_x - ones_x)
        y = [1] * ones_y + [0] * (size_y - ones_y)
        self.assertEqual(winsorize._merge(x, y, max, min), sorted(x + y, reverse=True))
        # Ascending order with min as `better`, as the smallest side uses it.
        self.assertEqual(winsorize._merge(x[::-1], y[::-1], min, max), sorted(x + y))

  def test_none_is_a_sentinel_worse_than_any_value(self):
    self.assertEqual(winsorize._merge([5, None, None], [7, 1], max, min)[:3], [7, 5, 1])
    self.assertEqual(winsorize._merge([None], [None], max, min), [None, None])

  @parameterized.product(batch=[1, 9, 11, 23, 100], kind=['ties', 'sparse'])
  def test_merging_and_insertion_give_the_same_bits(self, batch, kind):
    values = tf.constant(fresh_values(kind, batch, (7, 3), seed=batch))
    # Every example kept (batch, batch) only for small batches: it compiles slowly.
    sizes = {(1, 4), (5, 5), (9, 9), (12, 7)} | (
        {(batch, batch), (batch, 1)} if batch <= 11 else set())
    for num_largest, num_smallest in sorted(sizes):
      if max(num_largest, num_smallest) > batch:
        continue
      by_merging, by_insertion = (
          tf.function(lambda f=f: f(lambda e: values[e], batch, [7, 3], num_largest,
                                    num_smallest), jit_compile=True)()
          for f in (winsorize._extremes_by_merging, winsorize._extremes_by_insertion))
      for merged, inserted in zip(by_merging, by_insertion):
        for x, y in zip(merged, inserted):
          self.assertAllEqual(x, y, msg=f'{num_largest}, {num_smallest}')
      self.assertEqual([len(side) for side in by_merging], [num_largest, num_smallest])


class AuthorsRuleTest(tf.test.TestCase):

  def test_the_benchmarked_authors_rule_computes_the_fast_path(self):
    rng = np.random.default_rng(3)
    for c in (1, 2, 4, 8):
      a = rng.normal(size=(100, 12)) * (rng.random((100, 12)) < 0.3)  # exact zeros, as blank pixels
      delta = np.round(rng.normal(size=(100, 5)), 1) / 100             # ties
      kernel, bias = bench_step.authors_winsorized_sums(a, delta, c)
      fast_kernel = winsorize.winsorized_outer_sum_and_count(
          a.astype(np.float32), delta.astype(np.float32), float(c))[0]
      fast_bias = winsorize.winsorized_sum_and_count(delta.astype(np.float32), float(c))[0]
      self.assertAllClose(fast_kernel, kernel, atol=1e-6, rtol=0)
      self.assertAllClose(fast_bias, bias, atol=1e-6, rtol=0)
