"""The §2.4 decomposition against float64 per-example gradients summed by hand."""

import os

from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf

from cg_tf import data
from cg_tf import decomposition
from cg_tf import train
from cg_tf import workdir
from tests import reference
from tests import fixtures


def flat_per_example(model, x, y):
  """float64 [n, parameters]: each example's gradient, flattened, by hand."""
  grads = reference.mlp_per_example_gradients(
      [(layer.kernel.numpy(), layer.bias.numpy()) for layer in model.layers], x, y)
  return np.concatenate([g.reshape(len(y), -1) for g in grads], axis=1)


class DecompositionTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.product(hidden=[(5,), (6, 4)], size=[7, 33], chunk=[5, 100])
  def test_full_population_matches_float64(self, hidden, size, chunk):
    model = fixtures.random_model(hidden, size)
    x, y = (t.numpy() for t in fixtures.batch(size, size))
    per_example = flat_per_example(model, x, y)
    corrupt = np.random.default_rng(size).random(size) < 0.4
    g = per_example.sum(axis=0)
    g_p, g_c = per_example[~corrupt].sum(axis=0), per_example[corrupt].sum(axis=0)

    total = decomposition.total_gradient(model, x, y, chunk)
    self.assertAllClose(np.concatenate([t.numpy().ravel() for t in total]), g, rtol=1e-4,
                        atol=1e-5)
    s = decomposition.alignment(model, x, y, total, chunk)
    self.assertAllClose(s, per_example @ g, rtol=1e-4, atol=1e-4)
    inner = decomposition.group_inner_products(s, corrupt)
    self.assertAllClose(inner, [g @ g_p, g @ g_c], rtol=1e-4, atol=1e-4)
    f = decomposition.fractions(inner)
    self.assertAllClose(f, [g @ g_p / (g @ g), g @ g_c / (g @ g)], rtol=1e-4)
    self.assertAllClose(f.sum(), 1.0)

  def test_sampled_estimator_matches_float64(self):
    model = fixtures.random_model((7, 5), 1)
    x, y = (t.numpy() for t in fixtures.batch(1, 20))
    weights = decomposition.sample_weights(model, 4, seed=0)
    grads = reference.mlp_per_example_gradients(
        [(layer.kernel.numpy(), layer.bias.numpy()) for layer in model.layers], x, y)
    kernels = [grads[2 * i].reshape(20, -1)[:, w] for i, w in enumerate(weights)]
    sampled = np.concatenate(kernels, axis=1)
    self.assertEqual(sampled.shape, (20, 12))
    self.assertAllClose(decomposition.sampled_alignment(model, x, y, weights),
                        sampled @ sampled.sum(axis=0), rtol=1e-4, atol=1e-6)

  def test_cumulative_means(self):
    rng = np.random.default_rng(0)
    inner = rng.normal(size=(6, 2))
    corrupt = np.array([True, False, False, True, False])
    expected = np.array([[inner[:t + 1, 0].sum() / 3, inner[:t + 1, 1].sum() / 2]
                         for t in range(6)])
    self.assertAllClose(decomposition.cumulative_means(inner, corrupt), expected)

  def test_null_worlds_keep_group_sizes(self):
    corrupt = np.random.default_rng(1).random(1000) < 0.3
    nulls = decomposition.null_designations(corrupt, 5, seed=0)
    self.assertEqual(nulls.shape, (5, 1000))
    np.testing.assert_array_equal(nulls.sum(axis=1), np.full(5, corrupt.sum()))
    self.assertFalse(any(np.array_equal(n, corrupt) for n in nulls))
    np.testing.assert_array_equal(nulls, decomposition.null_designations(corrupt, 5, seed=0))

  @pytest.mark.slow  # trains
  def test_recorded_during_training_and_resumed(self):
    dataset = fixtures.separable_dataset(num_train=150)
    config = fixtures.tiny_config(noise=0.5, steps=30, decomp_every=10, decomp_dense_steps=4,
                                    null_worlds=3, decomp_sample_examples=50,
                                    decomp_sample_weights=20)
    whole = self.create_tempdir().full_path
    train.train_and_evaluate(config, whole, dataset)
    record = workdir.read_measurements(whole, workdir.DECOMPOSITION_FILE)
    np.testing.assert_array_equal(record['step'], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30])
    self.assertEqual(record['inner'].shape, (13, 4, 2))
    self.assertEqual(record['corrupt'].shape, (4, 150))
    noisy = data.make_noisy(dataset, 0, 0.5, 0)
    np.testing.assert_array_equal(record['corrupt'][0], noisy.corrupt)
    scalars = workdir.read_scalars(whole)
    total = (scalars['decomposition/f_pristine'] + scalars['decomposition/f_corrupt']).dropna()
    np.testing.assert_array_equal(total.index, record['step'])
    self.assertAllClose(total, np.ones(13))
    self.assertIn('decomposition_null3/f_pristine', scalars)
    self.assertEqual(int(scalars['decomposition/i_pristine'].notna().sum()), 11)

    # Stopped at step 10 (steps is resumable), then continued to 30.
    split = self.create_tempdir().full_path
    train.train_and_evaluate(config.__class__(**{**config.__dict__, 'steps': 10}), split,
                             dataset)
    train.train_and_evaluate(config, split, dataset)
    resumed = workdir.read_measurements(split, workdir.DECOMPOSITION_FILE)
    np.testing.assert_array_equal(resumed['step'], record['step'])
    self.assertAllClose(resumed['inner'], record['inner'], rtol=1e-6)
    self.assertTrue(os.path.exists(os.path.join(split, workdir.DECOMPOSITION_FILE)))
