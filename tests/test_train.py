"""The training loop on tiny synthetic data."""

import dataclasses
import os

from absl.testing import parameterized
import keras
import numpy as np
import pytest
import tensorflow as tf

from cg_tf import data
from cg_tf import train
from cg_tf import workdir as workdir_lib
from cg_tf.config import Config
from cg_tf.errors import UserInputError
from tests import reference
from tests import fixtures


class TrainTest(parameterized.TestCase, tf.test.TestCase):

  def test_fits_a_separable_problem(self):
    dataset = fixtures.separable_dataset()
    metrics = train.train_and_evaluate(fixtures.tiny_config(steps=300, eval_every=100),
                                       self.create_tempdir().full_path, dataset)
    self.assertEqual(metrics['train/accuracy'], 1.0)
    self.assertGreater(metrics['test/accuracy'], 0.9)

  @pytest.mark.slow  # trains
  def test_memorises_noisy_labels_and_records_learning_times(self):
    dataset = fixtures.separable_dataset(num_train=100)
    workdir = self.create_tempdir().full_path
    config = fixtures.tiny_config(hidden=(64,), noise=0.5, steps=1500, eval_every=500, batch_size=0,
                         learning_rate=0.5)
    metrics = train.train_and_evaluate(config, workdir, dataset)
    self.assertEqual(metrics['train/accuracy'], 1.0)
    record = np.load(os.path.join(workdir, 'examples.npz'))
    self.assertTrue(np.all(record['first_learned_step'] >= 0))
    self.assertTrue(np.all(record['learned_since_step'] >= record['first_learned_step']))
    # Pristine examples are learned first (Coherent Gradients, §2.3).
    corrupt = record['corrupt']
    self.assertLess(np.median(record['first_learned_step'][~corrupt]),
                    np.median(record['first_learned_step'][corrupt]))

  @parameterized.parameters('fast', 'xla', 'cpu_kernel', 'reference')
  def test_one_winsorized_step_matches_numpy(self, impl):
    dataset = fixtures.separable_dataset(num_train=40)
    config = fixtures.tiny_config(hidden=(8, 6), winsor_c=10, winsor_impl=impl, batch_size=40,
                         learning_rate=0.3)
    experiment = train.Experiment(config, data.make_noisy(dataset, 0, 0.0, 0))
    weights = [(layer.kernel.numpy(), layer.bias.numpy()) for layer in experiment.model.layers]
    x, y = dataset.train_images, dataset.train_labels
    experiment.train_step(tf.constant(x), tf.constant(y))
    per_example = reference.mlp_per_example_gradients(weights, x, y)
    flat = [w for pair in weights for w in pair]
    for variable, before, g in zip(experiment.model.trainable_variables, flat, per_example):
      # The loss is the batch mean: each example contributes g_e / batch.
      expected = before - 0.3 * reference.winsorized_sum(g / 40, 10)
      self.assertAllClose(variable, expected, rtol=1e-4, atol=1e-6)

  @parameterized.parameters('fast', 'xla')
  def test_one_winsorized_cnn_step_matches_float64_per_example_gradients(self, impl):
    # run.py --model=cnn: the loop's per-layer gradients of both convolutions
    # and both Dense layers against one float64 GradientTape per example.
    dataset = fixtures.separable_dataset(num_train=20, dims=784)
    config = fixtures.tiny_config(model='cnn', hidden=Config().hidden, winsor_c=10,
                                  winsor_impl=impl, batch_size=20, learning_rate=0.3)
    experiment = train.Experiment(config, data.make_noisy(dataset, 0, 0.0, 0))
    as_float64 = keras.models.clone_model(
        experiment.model, clone_function=lambda layer: layer.__class__.from_config(
            {**layer.get_config(), 'dtype': 'float64'}))
    as_float64.set_weights([w.astype(np.float64) for w in experiment.model.get_weights()])
    before = [v.numpy() for v in experiment.model.trainable_variables]
    x, y = dataset.train_images, dataset.train_labels
    per_example = reference.per_example_gradients_float64(as_float64, x.astype(np.float64), y)
    experiment.train_step(tf.constant(x), tf.constant(y))
    self.assertLen(per_example, 8)  # kernel and bias of conv_1, conv_2, hidden_1, logits
    for variable, w, g in zip(experiment.model.trainable_variables, before, per_example):
      expected = w - 0.3 * reference.winsorized_sum(g / 20, 10)
      self.assertAllClose(variable, expected, rtol=1e-4, atol=1e-6)

  @parameterized.parameters('fast', 'reference')
  def test_winsorizing_nothing_is_plain_sgd(self, impl):
    # With a batch of 20, c = 1 puts the percentiles at ranks round(0.19) = 0 and
    # 19: nothing is clipped, but the per-example machinery runs.
    dataset = fixtures.separable_dataset(num_train=100)
    plain = fixtures.final_weights(fixtures.tiny_config(), dataset, self.create_tempdir().full_path)
    winsorized = fixtures.final_weights(fixtures.tiny_config(winsor_c=1, winsor_impl=impl), dataset,
                               self.create_tempdir().full_path)
    for p, w in zip(plain, winsorized):
      self.assertAllClose(p, w, rtol=1e-4, atol=1e-5)

  def test_fast_path_equals_reference_in_training(self):
    dataset = fixtures.separable_dataset(num_train=100)
    fast = fixtures.final_weights(fixtures.tiny_config(winsor_c=10, noise=0.5), dataset,
                         self.create_tempdir().full_path)
    ref = fixtures.final_weights(fixtures.tiny_config(winsor_c=10, noise=0.5, winsor_impl='reference'), dataset,
                        self.create_tempdir().full_path)
    for f, r in zip(fast, ref):
      self.assertAllClose(f, r, rtol=1e-4, atol=1e-5)

  @pytest.mark.slow  # trains
  @parameterized.parameters({'winsor_c': 2}, {'winsor_c': 8},
                            {'aggregator': 'trimmed_mean', 'trim_k': 4})
  def test_cpu_kernel_and_xla_train_the_same_bits(self, **settings):
    dataset = fixtures.separable_dataset(num_train=200)
    runs = [fixtures.final_weights(fixtures.tiny_config(hidden=(16, 8), batch_size=100, noise=0.5,
                                      winsor_impl=impl, **settings),
                          dataset, self.create_tempdir().full_path)
            for impl in ('cpu_kernel', 'xla')]
    for by_kernel, by_xla in zip(*runs):
      self.assertAllEqual(by_kernel.view(np.int32), by_xla.view(np.int32))

  def test_same_config_same_numbers(self):
    dataset = fixtures.separable_dataset()
    a = fixtures.final_weights(fixtures.tiny_config(noise=0.3), dataset, self.create_tempdir().full_path)
    b = fixtures.final_weights(fixtures.tiny_config(noise=0.3), dataset, self.create_tempdir().full_path)
    c = fixtures.final_weights(fixtures.tiny_config(noise=0.3, seed=1), dataset, self.create_tempdir().full_path)
    for x, y in zip(a, b):
      self.assertAllEqual(x, y)
    self.assertNotAllClose(a[0], c[0])

  def test_full_batch_sees_every_example_each_step(self):
    dataset = fixtures.separable_dataset(num_train=50)
    experiment = train.Experiment(fixtures.tiny_config(batch_size=0), data.make_noisy(dataset, 0, 0, 0))
    self.assertEqual((experiment.batch_size, experiment.steps_per_epoch), (50, 1))

  def test_dead_units_match_numpy(self):
    # 200 training images in eval batches of 64, so activity is combined over
    # 4 batches. In layer 1, unit 0 fires for the last image alone (its only
    # input is feature 0, which is 1 there and 0 elsewhere), units 1-3 for
    # none (bias -1000); the rest, and layer 2, are whatever they are.
    dataset = fixtures.separable_dataset(num_train=200)
    images = dataset.train_images.copy()
    images[:, 0] = 0.0
    images[-1, 0] = 1.0
    dataset = dataclasses.replace(dataset, train_images=images)
    experiment = train.Experiment(fixtures.tiny_config(hidden=(16, 8)), data.make_noisy(dataset, 0, 0, 0))
    first = experiment.model.layers[0]
    kernel, bias = first.kernel.numpy(), first.bias.numpy()
    kernel[:, 0] = 0.0
    kernel[0, 0] = 1.0
    bias[0] = -0.5
    bias[1:4] = -1000.0
    first.kernel.assign(kernel)
    first.bias.assign(bias)
    metrics = experiment.evaluate()

    hidden, dead = images.astype(np.float64), []
    for layer in experiment.model.layers[:-1]:
      hidden = np.maximum(hidden @ layer.kernel.numpy().astype(np.float64) + layer.bias.numpy(), 0)
      if not dead:
        self.assertEqual(np.flatnonzero(hidden[:, 0]).tolist(), [199])
        self.assertFalse(hidden[:, 1:4].any())
      dead.append(np.all(hidden == 0, axis=0))
      self.assertEqual(metrics[f'dead_units/{layer.name}'], np.mean(dead[-1]))
    self.assertFalse(dead[0][0])
    self.assertTrue(dead[0][1:4].all())

  def test_a_logdir_on_another_filesystem(self):
    # TensorFlow's in-memory filesystem stands in for gs://: every file of the
    # run goes through tf.io.gfile, and the readers read it back.
    workdir = f'ram://cg_tf/{self.id()}/run'
    dataset = fixtures.separable_dataset(num_train=100)
    config = fixtures.tiny_config(noise=0.5, steps=20, decomp_every=10)
    metrics = train.train_and_evaluate(config, workdir, dataset)
    self.assertTrue(workdir_lib.is_finished(workdir))
    self.assertEqual(workdir_lib.read_config(workdir), config)
    self.assertEqual(workdir_lib.read_examples(workdir)['corrupt'].shape, (100,))
    self.assertIsNotNone(workdir_lib.read_measurements(workdir, workdir_lib.DECOMPOSITION_FILE))
    self.assertAlmostEqual(workdir_lib.read_scalars(workdir)['train/accuracy'][20],
                           metrics['train/accuracy'], places=6)
    self.assertTrue(tf.train.latest_checkpoint(f'{workdir}/checkpoints'))
    with self.assertRaisesRegex(UserInputError, 'holds a run with other settings'):
      workdir_lib.prepare(workdir, fixtures.tiny_config(noise=0.25, steps=20))


class LabelNoiseMetricsTest(parameterized.TestCase):
  """train.label_noise_metrics against a loop over the examples."""

  @parameterized.parameters(('random', 0), ('random', 1), ('one_class', 2), ('tied', 3))
  def test_against_a_loop(self, predictions, seed):
    rng = np.random.default_rng(seed)
    noisy = data.make_noisy(fixtures.separable_dataset(num_train=60, num_test=30, seed=seed),
                            0, 0.5, seed)
    train_loss, test_loss = rng.random(60), rng.random(30)
    train_prediction = {'random': rng.integers(0, 10, 60),
                        'one_class': np.full(60, 7),  # collapsed to one class
                        'tied': np.repeat([2, 5, 9], 20)}[predictions]  # three classes tie
    test_prediction = rng.integers(0, 10, 30)
    metrics, fitted = train.label_noise_metrics(noisy, 0.5, train_loss, train_prediction,
                                                test_loss, test_prediction)
    labels, clean = noisy.train_labels, noisy.data.train_labels
    counts = {}
    for p in train_prediction:
      counts[p] = counts.get(p, 0) + 1
    expected_share = {'random': max(counts.values()) / 60, 'one_class': 1.0,
                      'tied': 1 / 3}[predictions]
    self.assertEqual(max(counts.values()) / 60, expected_share)
    self.assertAlmostEqual(metrics['train/most_common_prediction'], expected_share, places=12)
    self.assertEqual(fitted.tolist(), [p == y for p, y in zip(train_prediction, labels)])
    corrupt = [i for i in range(60) if labels[i] != clean[i]]
    pristine = [i for i in range(60) if labels[i] == clean[i]]
    self.assertNotEmpty(corrupt)
    for split, indices in (('train', range(60)), ('train_corrupt', corrupt),
                           ('train_pristine', pristine)):
      self.assertAlmostEqual(metrics[f'{split}/accuracy'],
                             sum(train_prediction[i] == labels[i] for i in indices) / len(indices))
      self.assertAlmostEqual(metrics[f'{split}/loss'],
                             sum(train_loss[i] for i in indices) / len(indices))
    test_accuracy = sum(p == y for p, y in zip(test_prediction, noisy.data.test_labels)) / 30
    self.assertAlmostEqual(metrics['test/accuracy'], test_accuracy)
    self.assertAlmostEqual(metrics['overfit'],
                           metrics['train/accuracy'] - (0.05 + 0.5 * test_accuracy))
