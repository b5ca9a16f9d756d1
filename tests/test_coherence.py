"""Coherence measures against float64 per-example gradients formed one by one."""

import json
import os

from absl.testing import parameterized
import keras
import numpy as np
import pytest
import tensorflow as tf

from cg_tf import coherence
from cg_tf import data
from cg_tf import train
from cg_tf import workdir
from cg_tf.config import Config
from cg_tf.errors import UserInputError
from tests import fixtures
from tests import reference


def per_layer_gradients(model, x, y):
  """Per layer, float64 [n, fan_in * fan_out + fan_out]: each example's gradient, by hand."""
  grads = reference.mlp_per_example_gradients(
      [(layer.kernel.numpy(), layer.bias.numpy()) for layer in model.layers], x, y)
  return [np.concatenate([grads[2 * i].reshape(len(y), -1), grads[2 * i + 1]], axis=1)
          for i in range(len(model.layers))]


def awkward_batch(size, seed):
  """Inputs with exact zeros (blank pixels) and labels; float32 [size, 5], int32 [size]."""
  x, y = (t.numpy() for t in fixtures.batch(size, size))
  rng = np.random.default_rng(seed)
  x[:, 1] = 0.0
  x[rng.random(x.shape) < 0.2] = 0.0
  return x, y


class StatisticsTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.product(hidden=[(6,), (7, 4)], size=[1, 9, 40], chunk=[7, 100])
  def test_layer_statistics_match_float64(self, hidden, size, chunk):
    model = fixtures.random_model(hidden, size)
    x, y = awkward_batch(size, size)
    corrupt = np.random.default_rng(size).random(size) < 0.4
    sums, sq_norms = coherence.layer_statistics(model, x, y, corrupt, chunk)
    for layer, (s, g) in enumerate(zip(sums, per_layer_gradients(model, x, y))):
      # Each layer's parameters flat: the kernel, then the bias.
      self.assertAllClose(s.total_sum, g.sum(axis=0), rtol=1e-4, atol=1e-6)
      self.assertAllClose(s.corrupt_sum, g[corrupt].sum(axis=0), rtol=1e-4, atol=1e-6)
      self.assertAllClose(s.square_sum, (g * g).sum(axis=0), rtol=1e-4, atol=1e-8)
      self.assertAllEqual(s.sign_sum, np.sign(g).sum(axis=0))
      self.assertAllEqual(s.nonzero, (g != 0).sum(axis=0))
      self.assertAllClose(sq_norms[:, layer], (g * g).sum(axis=1), rtol=1e-4, atol=1e-8)
      kernel, bias = s.variable_totals()
      self.assertAllClose(kernel, g[:, :-bias.size].sum(axis=0).reshape(kernel.shape),
                          rtol=1e-4, atol=1e-6)

  @parameterized.parameters('conv2d', 'embedding', 'group_norm')
  def test_layer_statistics_of_other_layers_match_float64(self, name):
    x, y = fixtures.zoo_batch(name, 9)
    model = fixtures.zoo_model(name)
    corrupt = np.arange(9) % 3 == 0
    sums, sq_norms = coherence.layer_statistics(model, x, y, corrupt, 4)
    per_example = reference.per_example_gradients_float64(fixtures.zoo_model(name, 'float64'),
                                                          x, y)
    layers = [layer for layer in model.layers if layer.trainable_weights]
    start = 0
    for i, (s, layer) in enumerate(zip(sums, layers)):
      g = np.concatenate([p.reshape(9, -1) for p in
                          per_example[start:start + len(layer.trainable_weights)]], axis=1)
      start += len(layer.trainable_weights)
      self.assertAllClose(s.total_sum, g.sum(axis=0), rtol=1e-4, atol=1e-5)
      self.assertAllClose(s.corrupt_sum, g[corrupt].sum(axis=0), rtol=1e-4, atol=1e-5)
      self.assertAllClose(s.square_sum, (g * g).sum(axis=0), rtol=1e-4, atol=1e-6)
      self.assertAllClose(sq_norms[:, i], (g * g).sum(axis=1), rtol=1e-4, atol=1e-6)

  @parameterized.parameters(1, 2, 25)
  def test_m_coherence_matches_float64_and_inverse_gradient_diversity(self, size):
    model = fixtures.random_model((6, 5), size)
    x, y = awkward_batch(size, size)
    corrupt = np.arange(size) % 3 == 0
    got = coherence.group_m_coherence(*coherence.layer_statistics(model, x, y, corrupt, 10),
                                      corrupt)
    per_layer = per_layer_gradients(model, x, y)
    whole = np.concatenate(per_layer, axis=1)
    for g_index, mask in enumerate((np.ones(size, bool), ~corrupt, corrupt)):
      for layer, g in enumerate([*per_layer, whole]):
        if not mask.any():
          self.assertTrue(np.isnan(got[g_index, layer]))
          continue
        subset = g[mask]
        diversity = (subset * subset).sum() / np.sum(subset.sum(axis=0) ** 2)  # Yin et al.
        self.assertAllClose(got[g_index, layer], 1 / diversity, rtol=1e-4)

  @parameterized.parameters(2, 3, 10)
  def test_m_coherence_of_identical_examples_is_m(self, m):
    model = fixtures.random_model((6,), m)
    x, y = awkward_batch(1, m)
    x, y = np.repeat(x, m, axis=0), np.repeat(y, m)
    got = coherence.group_m_coherence(
        *coherence.layer_statistics(model, x, y, np.zeros(m, bool), 4), np.zeros(m, bool))
    self.assertAllClose(got[0], np.full(3, m), rtol=1e-5)

  @parameterized.parameters(2, 3, 6)
  def test_m_coherence_of_orthogonal_gradients_is_1(self, m):
    # A linear model: g_e = (outer(a_e, delta_e), delta_e) and <g_e, g_f> =
    # (<a_e, a_f> + 1) <delta_e, delta_f>, so inputs with <a_e, a_f> = -1 make
    # the gradients orthogonal whatever the errors: simplex vertices, scaled.
    vertices = (np.eye(m) - 1.0 / m) * np.sqrt(m)
    self.assertAllClose(vertices @ vertices.T - np.diag(np.diag(vertices @ vertices.T)),
                        -(1 - np.eye(m)))
    model = keras.Sequential([keras.Input((m,)), keras.layers.Dense(4)])
    model.layers[0].kernel.assign(np.random.default_rng(m).normal(size=(m, 4)))
    labels = np.arange(m, dtype=np.int32) % 4
    got = coherence.group_m_coherence(
        *coherence.layer_statistics(model, vertices.astype(np.float32), labels,
                                    np.zeros(m, bool), 10), np.zeros(m, bool))
    self.assertAllClose(got[0], [1.0, 1.0], rtol=1e-5)

  def test_gsnr_and_sign_majority_match_float64(self):
    model = fixtures.random_model((6,), 3)
    x, y = awkward_batch(30, 3)
    sums, _ = coherence.layer_statistics(model, x, y, np.zeros(30, bool), 8)
    for layer, (s, g) in enumerate(zip(sums, per_layer_gradients(model, x, y))):
      mean, variance = g.mean(axis=0), g.var(axis=0)
      varies = variance > 1e-20
      if layer == 0:
        self.assertTrue((~varies).any(), 'the blank input should give never-varying kernels')
      got = coherence.gsnr(s.total_sum / 30, s.square_sum / 30).ravel()
      self.assertTrue(np.isnan(got[~varies]).all())
      self.assertAllClose(got[varies], mean[varies] ** 2 / variance[varies], rtol=1e-3)
      positive, negative = (g > 0).sum(axis=0), (g < 0).sum(axis=0)
      expected = np.full(g.shape[1], np.nan)
      nonzero = positive + negative > 0
      expected[nonzero] = np.maximum(positive, negative)[nonzero] / (positive + negative)[nonzero]
      self.assertAllClose(coherence.sign_majority(s.sign_sum, s.nonzero).ravel(), expected)

  def test_gradient_cosines_and_class_stiffness_match_float64(self):
    model = fixtures.random_model((6, 5), 4)
    x, y = awkward_batch(24, 4)
    y[:6] = 2  # ties: several examples of one class
    flat = np.concatenate(per_layer_gradients(model, x, y), axis=1)
    norms = np.linalg.norm(flat, axis=1)
    expected = flat @ flat.T / np.outer(norms, norms)
    cosines = coherence.gradient_cosines(model, x, y)
    self.assertAllClose(cosines, expected, rtol=1e-4, atol=1e-6)

    matrix = coherence.class_stiffness(cosines, y, 10)
    for i in range(10):
      for j in range(10):
        pairs = [cosines[e, f] for e in range(24) for f in range(24)
                 if e != f and y[e] == i and y[f] == j]
        if pairs:
          self.assertAllClose(matrix[i, j], np.mean(pairs))
        else:
          self.assertTrue(np.isnan(matrix[i, j]), (i, j))

  def test_class_stiffness_of_one_class(self):
    cosines = np.array([[1.0, 0.5, -0.2], [0.5, 1.0, 0.1], [-0.2, 0.1, 1.0]])
    matrix = coherence.class_stiffness(cosines, np.array([3, 3, 3]), 4)
    self.assertAllClose(matrix[3, 3], (0.5 - 0.2 + 0.1) / 3)
    self.assertEqual(int(np.isnan(matrix).sum()), 15)
    image = coherence.stiffness_image(matrix, scale=2)
    self.assertEqual(image.shape, (1, 8, 8, 3))
    self.assertAllClose(image[0, 0, 0], [0.5, 0.5, 0.5])  # NaN is grey

  def test_count_forgetting_matches_a_loop(self):
    rng = np.random.default_rng(0)
    presentations = rng.random((12, 5)) < 0.6
    last, events = np.full(5, -1, np.int8), np.zeros(5, np.int32)
    expected = np.zeros(5, np.int32)
    previous = [None] * 5
    for correct in presentations:
      for e in range(5):
        expected[e] += previous[e] is True and not correct[e]
        previous[e] = bool(correct[e])
      last, forgotten = (t.numpy() for t in coherence.count_forgetting(tf.constant(last),
                                                                        tf.constant(correct)))
      events += forgotten
    self.assertAllEqual(events, expected)
    self.assertAllEqual(last, presentations[-1].astype(np.int8))


class TrainingTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.parameters(0, 2)
  def test_forgetting_counted_in_the_step_matches_a_replay(self, winsor_c):
    dataset = fixtures.separable_dataset(num_train=60)
    config = fixtures.tiny_config(noise=0.5, steps=30, forgetting=True, winsor_c=winsor_c)
    experiment = train.Experiment(config, data.make_noisy(dataset, 0, 0.5, 0))
    labels = experiment.train_labels.numpy()
    previous, events, correct_count = {}, np.zeros(60, np.int32), np.zeros(60, np.int32)
    for step in range(30):
      # Predictions of every example before the step; the step presents a batch of them.
      predicted = np.argmax(experiment.model(experiment.train_images).numpy(), axis=1)
      experiment.train_steps(tf.constant(1, tf.int64))
      start = step % experiment.steps_per_epoch * 20
      for e in experiment.permutation.numpy()[start:start + 20]:
        correct = predicted[e] == labels[e]
        events[e] += previous.get(e, False) and not correct
        correct_count[e] += correct
        previous[e] = correct
    record = experiment.examples_record()
    self.assertGreater(events.sum(), 0, 'the replay should see some forgetting')
    self.assertAllEqual(record['forgetting_events'], events)
    self.assertAllEqual(record['correct_presentations'], correct_count)
    self.assertAllEqual(record['last_correct'],
                        [int(previous[e]) if e in previous else -1 for e in range(60)])

  @pytest.mark.slow  # trains
  def test_recorded_during_training_and_resumed(self):
    dataset = fixtures.separable_dataset(num_train=150)
    config = fixtures.tiny_config(noise=0.5, steps=30, coherence_every=10,
                                    decomp_dense_steps=3, stiffness_examples=40,
                                    forgetting=True)
    whole = self.create_tempdir().full_path
    train.train_and_evaluate(config, whole, dataset)
    record = workdir.read_measurements(whole, workdir.COHERENCE_FILE)
    np.testing.assert_array_equal(record['step'], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30])
    self.assertEqual(record['m_coherence'].shape, (13, 3, 3))
    self.assertEqual(record['stiffness'].shape, (13, 10, 10))
    self.assertEqual(record['example_coherence'].shape, (150,))
    self.assertEqual(int(record['example_coherence_step']), 0)
    scalars = workdir.read_scalars(whole)
    np.testing.assert_array_equal(scalars['coherence/m_coherence'].dropna().index, record['step'])
    self.assertAllClose(scalars['coherence/m_coherence'].dropna(), record['m_coherence'][:, 0, -1])
    for tag in ('coherence/m_coherence_corrupt', 'gsnr/layer2/median', 'stiffness/same_class'):
      self.assertIn(tag, scalars)
    examples = workdir.read_examples(whole)
    self.assertEqual(examples['forgetting_events'].shape, (150,))

    # At step 0, c_e from the run equals the float64 definition.
    noisy = data.make_noisy(dataset, 0, 0.5, 0)
    fresh = train.Experiment(config, noisy)
    flat = np.concatenate(per_layer_gradients(fresh.model, noisy.data.train_images,
                                              noisy.train_labels), axis=1)
    expected = flat @ flat.sum(axis=0) / (flat * flat).sum(axis=1)
    self.assertAllClose(record['example_coherence'], expected, rtol=1e-3, atol=1e-3)

    # Stopped at step 10 (steps is resumable), then continued to 30.
    split = self.create_tempdir().full_path
    train.train_and_evaluate(Config(**{**config.__dict__, 'steps': 10}), split, dataset)
    train.train_and_evaluate(config, split, dataset)
    resumed = workdir.read_measurements(split, workdir.COHERENCE_FILE)
    for key, value in record.items():
      if not key.endswith('seconds'):
        self.assertAllClose(resumed[key], value, rtol=1e-6, msg=key)
    resumed_examples = workdir.read_examples(split)
    for key in ('forgetting_events', 'correct_presentations', 'last_correct'):
      self.assertAllEqual(resumed_examples[key], examples[key], msg=key)

  def test_stiffness_needs_the_coherence_schedule(self):
    with self.assertRaisesRegex(UserInputError, '--stiffness_examples=100 is measured on the '
                                '--coherence_every schedule'):
      fixtures.tiny_config(stiffness_examples=100)

  def test_a_run_made_before_the_new_settings_resumes(self):
    dataset = fixtures.separable_dataset(num_train=60)
    config = fixtures.tiny_config(steps=10)
    logdir = self.create_tempdir().full_path
    train.train_and_evaluate(config, logdir, dataset)
    path = os.path.join(logdir, 'config.json')
    with open(path) as f:
      text = f.read()
    old = {k: v for k, v in json.loads(text).items()
           if k not in ('coherence_every', 'stiffness_examples', 'forgetting')}
    with open(path, 'w') as f:
      json.dump(old, f)
    train.train_and_evaluate(Config(**{**config.__dict__, 'steps': 20}), logdir, dataset)
    with self.assertRaisesRegex(UserInputError, 'forgetting=False there vs True now'):
      train.train_and_evaluate(Config(**{**config.__dict__, 'steps': 20, 'forgetting': True}),
                               logdir, dataset)
