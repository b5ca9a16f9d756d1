"""Every aggregator against float64 NumPy definitions, step by step inside the training loop."""

import os
import re

from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf

from cg_tf import aggregators
from cg_tf import config as config_lib
from cg_tf import data
from cg_tf import gradients
from cg_tf import train
from cg_tf import winsorize
from cg_tf.config import Config
from cg_tf.errors import UserInputError
from tests import fixtures
from tests import reference


def awkward_values(batch, width, seed):
  """float32 [batch, width] with ties, exact zeros and constant columns."""
  rng = np.random.default_rng(seed)
  values = rng.normal(size=(batch, width)).astype(np.float32)
  values[:, 0] = 0.0
  values[:, 1] = 1.5
  values[rng.random((batch, width)) < 0.2] = 0.0
  values[:, 2] = np.round(values[:, 2])  # many ties
  return values


class OrderStatisticsTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.product(batch=[3, 10, 33, 100], k=[1, 4, 'largest'],
                         backend=winsorize.BACKENDS)
  def test_trimmed_sums_match_sorting(self, batch, k, backend):
    k = (batch - 1) // 2 if k == 'largest' else min(k, (batch - 1) // 2)
    a, d = awkward_values(batch, 6, batch), awkward_values(batch, 5, batch + 1)
    outer = np.einsum('bi,bo->bio', a.astype(np.float64), d.astype(np.float64))
    expected = np.sort(outer, axis=0)[k:batch - k].sum(axis=0)
    self.assertAllClose(winsorize.trimmed_outer_sum(a, d, k, backend=backend), expected,
                        rtol=1e-5, atol=1e-5)
    self.assertAllClose(winsorize.trimmed_sum(d, k, backend=backend),
                        np.sort(d.astype(np.float64), axis=0)[k:batch - k].sum(axis=0),
                        rtol=1e-5, atol=1e-5)

  @parameterized.parameters(*winsorize.BACKENDS)
  def test_trimmed_sums_of_own_columns(self, backend):
    a, d = awkward_values(20, 4, 0), awkward_values(20, 6, 1)
    whole = winsorize.trimmed_outer_sum(a, d, 3, backend=backend).numpy()
    columns = tf.constant([4, 1, -1], tf.int32)
    part = winsorize.trimmed_outer_sum(a, d, 3, columns, backend=backend).numpy()
    self.assertAllEqual(part[:, :2], whole[:, [4, 1]])
    self.assertAllEqual(part[:, 2], np.zeros(4))

  @parameterized.product(batch=[1, 2, 7, 10, 100], backend=winsorize.BACKENDS)
  def test_median_matches_numpy(self, batch, backend):
    a, d = awkward_values(batch, 5, batch), awkward_values(batch, 4, 2 * batch)
    self.assertAllClose(aggregators.median(d), np.median(d.astype(np.float64), axis=0),
                        rtol=1e-6, atol=1e-7)
    outer = np.einsum('bi,bo->bio', a.astype(np.float64), d.astype(np.float64))
    self.assertAllClose(aggregators.outer_median(a, d, backend), np.median(outer, axis=0),
                        rtol=1e-5, atol=1e-6)

  @parameterized.product(batch=[10, 11], backend=winsorize.BACKENDS)
  def test_outer_median_with_mostly_zero_rows_and_columns(self, batch, backend):
    a, d = awkward_values(batch, 8, 3), awkward_values(batch, 6, 4)
    half = batch // 2
    a[:half + 1, 3] = 0.0  # more than half zero: the row's median is 0
    a[:half, 4] = 0.0  # half (even batch) or fewer: sorted like any other
    a[:, 5] = 0.0
    d[:half + 1, 2] = 0.0
    d[1:half + 1, 3] = 0.0
    outer = np.einsum('bi,bo->bio', a.astype(np.float64), d.astype(np.float64))
    self.assertAllClose(aggregators.outer_median(a, d, backend), np.median(outer, axis=0),
                        rtol=1e-5, atol=1e-6)

  @parameterized.parameters(*winsorize.BACKENDS)
  def test_outer_median_when_every_row_or_column_is_mostly_zero(self, backend):
    a, d = awkward_values(10, 4, 5), awkward_values(10, 3, 6)
    self.assertAllEqual(aggregators.outer_median(np.zeros_like(a), d, backend), np.zeros((4, 3)))
    self.assertAllEqual(aggregators.outer_median(a, np.zeros_like(d), backend), np.zeros((4, 3)))
    # As in the training step: traced once.
    median = tf.function(lambda a, d: aggregators.outer_median(a, d, backend))
    self.assertAllEqual(median(np.zeros_like(a), d), np.zeros((4, 3)))
    outer = np.einsum('bi,bo->bio', a.astype(np.float64), d.astype(np.float64))
    self.assertAllClose(median(a, d), np.median(outer, axis=0), rtol=1e-5, atol=1e-6)

  def test_median_of_three(self):
    # The authors' formula, sum - min - max, rounds in float32; the middle value does not.
    x = awkward_values(3, 50, 0)
    self.assertAllClose(aggregators.median_of_three(x[0], x[1], x[2]), np.median(x, axis=0),
                        rtol=1e-6, atol=1e-6)

  def test_dp_epsilon(self):
    args = dict(num_examples=60000, batch_size=256, delta=1e-5)
    self.assertEqual(aggregators.dp_epsilon(steps=0, noise_multiplier=1.1, **args), 0.0)
    self.assertEqual(aggregators.dp_epsilon(steps=10, noise_multiplier=0.0, **args), float('inf'))
    more_steps = [aggregators.dp_epsilon(steps=s, noise_multiplier=1.1, **args)
                  for s in (1000, 5000, 14062)]
    self.assertEqual(more_steps, sorted(more_steps))
    self.assertGreater(aggregators.dp_epsilon(steps=5000, noise_multiplier=0.8, **args),
                       more_steps[1])

  @parameterized.product(noise_multiplier=(1.1, 2.0), delta=(1e-5, 1e-6))
  def test_dp_epsilon_matches_rdp_by_hand(self, noise_multiplier, delta):
    # 1,000 steps of 256 from 60,000: the best RDP orders are integers (12 and
    # 42), where the binomial formula of reference.dp_sgd_epsilon is exact.
    expected = reference.dp_sgd_epsilon(256 / 60000, noise_multiplier, 1000, delta)
    self.assertAllClose(aggregators.dp_epsilon(60000, 256, 1000, noise_multiplier, delta),
                        expected, rtol=1e-6, atol=0)

  def test_dp_epsilon_depends_on_delta(self):
    loose, tight = (aggregators.dp_epsilon(60000, 256, 1000, 1.1, delta) for delta in (1e-5, 1e-6))
    self.assertGreater(tight, loose * 1.1)


def library_update(model, aggregator, x, y):
  """The update `aggregator` makes from the minibatch (x, y) of `model`, by the library.

  The per-example gradients come from gradients.recording, as run.py's and
  fit's steps take them, on the scale the aggregator asks for.
  """
  variables = model.trainable_variables
  batch = len(y)
  aggregator.build(variables, on_cpus=True)

  @tf.function
  def update():
    scale = 1.0 / batch if aggregator.per_example_scale == 'mean' else 1.0
    with tf.GradientTape(persistent=True) as tape:
      with gradients.recording(model) as record:
        logits = model(x)
      losses = gradients.per_example_loss(y, logits)
      mean, total = tf.reduce_mean(losses), tf.reduce_sum(losses) * scale
    return aggregator.aggregate(aggregators.Minibatch(
        variables=variables, batch_size=batch, step=tf.constant(0, tf.int64),
        mean_gradient=lambda: tape.gradient(mean, variables),
        per_example=lambda: record.gradients(tape, total),
        vectorized_map=lambda: gradients.per_example_gradients(
            model, gradients.per_example_loss, x, y)))

  return [tf.convert_to_tensor(u).numpy() for u in update()]


# Every rule that reads per-example gradients, with settings that clip on a batch of 12.
PER_EXAMPLE_RULES = {
    'mean': ('mean', {}, {}),
    'winsorize_c10': ('winsorize', {'c': 10}, {'c': 10}),
    'winsorize_c30': ('winsorize', {'c': 30}, {'c': 30}),
    'trimmed_mean_k2': ('trimmed_mean', {'k': 2}, {'k': 2}),
    'median': ('median', {}, {}),
    'l2clip': ('l2clip', {'clip_norm': 0.5}, {'clip_norm': 0.5}),
    'dp_without_noise': ('dp', {'clip_norm': 0.5}, {'clip_norm': 0.5}),
}


class EveryLayerEveryRuleTest(parameterized.TestCase, tf.test.TestCase):
  """Each rule on each model of the zoo (a layer type of gradients.RULES, or the
  vectorized_map fallback) against NumPy on float64 gradients, one tape per example."""

  def check(self, name, rule, size, backend='fast'):
    aggregator_name, settings, reference_settings = PER_EXAMPLE_RULES[rule]
    if aggregator_name in ('winsorize', 'trimmed_mean', 'median'):
      settings = {**settings, 'impl': backend}
    x, y = fixtures.zoo_batch(name, size)
    model = fixtures.zoo_model(name)
    got = library_update(model, aggregators.get(aggregator_name, **settings), x, y)
    per_example = reference.per_example_gradients_float64(fixtures.zoo_model(name, 'float64'),
                                                          x, y)
    reference_rule = 'l2clip' if aggregator_name == 'dp' else aggregator_name
    expected = reference.aggregate(
        reference_rule, np.concatenate([g.reshape(size, -1) for g in per_example], axis=1),
        **reference_settings)
    self.assertAllClose(flat(got), expected, rtol=1e-4, atol=1e-5)

  @parameterized.product(name=fixtures.ZOO, rule=tuple(PER_EXAMPLE_RULES))
  def test_on_a_batch_with_ties_and_zeros(self, name, rule):
    self.check(name, rule, 12)

  @parameterized.product(name=fixtures.ZOO, rule=('mean', 'winsorize_c10', 'median', 'l2clip'))
  def test_on_a_batch_of_one(self, name, rule):
    self.check(name, rule, 1)

  @parameterized.product(rule=('winsorize_c10', 'trimmed_mean_k2', 'median'),
                         backend=('xla', 'cpu_kernel'))
  def test_both_backends_on_a_convolution(self, rule, backend):
    self.check('conv2d', rule, 12, backend)

  def test_a_rule_of_its_own_is_one_class(self):

    class SignSum(aggregators.Aggregator):
      """The sign of the summed gradient: a rule made for this test."""
      name = 'sign_sum'

      def aggregate(self, minibatch):
        return [tf.sign(v.scatter(tf.reduce_sum(v.values(), axis=0)))
                for v in minibatch.per_example()]

    x, y = fixtures.zoo_batch('conv2d', 6)
    got = library_update(fixtures.zoo_model('conv2d'), SignSum(), x, y)
    per_example = reference.per_example_gradients_float64(fixtures.zoo_model('conv2d', 'float64'),
                                                          x, y)
    for g, e in zip(got, per_example):
      self.assertAllEqual(g, np.sign(e.sum(axis=0)))


def one_step_config(aggregator, **settings):
  return fixtures.tiny_config(hidden=(8,), batch_size=20, noise=0.5, aggregator=aggregator,
                                **settings)


def flat(arrays):
  return np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in arrays])


class InTheLoopTest(parameterized.TestCase, tf.test.TestCase):
  """Runs the real compiled step and replays it with the NumPy definitions."""

  def replay(self, config, num_steps, update_rule):
    """Runs num_steps one by one; checks each against w - lr * update_rule(per_example, step)."""
    dataset = fixtures.separable_dataset(num_train=60)
    experiment = train.Experiment(config, data.make_noisy(dataset, 0, config.noise, 0))
    images, labels = experiment.train_images.numpy(), experiment.train_labels.numpy()
    for step in range(num_steps):
      weights = [v.numpy() for v in experiment.model.trainable_variables]
      experiment.train_steps(tf.constant(1, tf.int64))
      start = step % experiment.steps_per_epoch * config.batch_size
      batch = experiment.permutation.numpy()[start:start + config.batch_size]
      per_example = reference.mlp_per_example_gradients(
          [(w, b) for w, b in zip(weights[::2], weights[1::2])], images[batch], labels[batch])
      per_example = np.concatenate([g.reshape(len(batch), -1) for g in per_example], axis=1)
      expected = flat(weights) - config.learning_rate * update_rule(per_example, step)
      self.assertAllClose(flat(experiment.model.trainable_variables), expected, rtol=1e-4,
                          atol=2e-6, msg=f'step {step}')
    return experiment

  @parameterized.named_parameters(
      ('mean', 'mean', {}),
      ('winsorize', 'winsorize', {'winsor_c': 10}),
      ('trimmed_mean_1', 'trimmed_mean', {'trim_k': 1}),
      ('trimmed_mean_9', 'trimmed_mean', {'trim_k': 9}),
      ('median', 'median', {}),
      ('l2clip_tight', 'l2clip', {'clip_norm': 0.05}),
      ('l2clip_loose', 'l2clip', {'clip_norm': 100.0}),
  )
  def test_per_example_aggregators(self, aggregator, settings):
    reference_settings = {'c': settings.get('winsor_c'), 'k': settings.get('trim_k'),
                          'clip_norm': settings.get('clip_norm')}
    self.replay(one_step_config(aggregator, **settings), 4,
                lambda g, _: reference.aggregate(aggregator, g, **reference_settings))

  @parameterized.parameters('m3', 'rm3', 'ra3')
  def test_over_minibatches_match_the_authors_ring_buffer(self, rule):
    buffer, counter = [], [0]

    def authors_update(per_example, _):
      # rm3.py: the first gradient fills the 3-slot buffer, each next one goes
      # to slot counter % 3; an update once 3 have been seen (m3: every third).
      g = per_example.mean(axis=0)
      if not buffer:
        buffer.extend([g.copy(), g.copy(), g.copy()])
        counter[0] = 1
      else:
        buffer[counter[0] % 3] = g
        counter[0] += 1
      if counter[0] < 3 or (rule == 'm3' and counter[0] % 3):
        return np.zeros_like(g)
      stacked = np.stack(buffer)
      return stacked.mean(axis=0) if rule == 'ra3' else np.median(stacked, axis=0)

    self.replay(one_step_config(rule), 8, authors_update)

  def test_dp_without_noise_is_l2clip_and_its_noise_has_the_right_spread(self):
    self.replay(one_step_config('dp', clip_norm=0.05), 3,
                lambda g, _: reference.aggregate('l2clip', g, clip_norm=0.05))
    noisy_config = fixtures.tiny_config(hidden=(64,), batch_size=20, noise=0.5,
                                          aggregator='dp', clip_norm=0.05, noise_multiplier=2.0)
    plain_config = Config(**{**noisy_config.__dict__, 'noise_multiplier': 0.0})
    dataset = fixtures.separable_dataset(num_train=60)
    noisy_data = data.make_noisy(dataset, 0, 0.5, 0)
    noisy, plain = (train.Experiment(c, noisy_data) for c in (noisy_config, plain_config))
    for experiment in (noisy, plain):
      experiment.train_steps(tf.constant(1, tf.int64))
    # w_noisy - w_plain = -lr * N(0, (sigma C)^2) / B per coordinate.
    z = (flat(noisy.model.trainable_variables) - flat(plain.model.trainable_variables)) / (
        -noisy_config.learning_rate * 2.0 * 0.05 / 20)
    self.assertGreater(z.size, 1000)
    self.assertAllClose([z.mean(), z.std()], [0.0, 1.0], atol=0.06)

  @pytest.mark.slow  # trains
  @parameterized.named_parameters(
      ('dp', {'aggregator': 'dp', 'clip_norm': 0.05, 'noise_multiplier': 1.0}),
      ('rm3', {'aggregator': 'rm3'}),
      ('m3', {'aggregator': 'm3'}),
      ('ra3', {'aggregator': 'ra3'}),
      ('trimmed_mean', {'aggregator': 'trimmed_mean', 'trim_k': 2}),
  )
  def test_a_resumed_run_has_the_same_bits(self, settings):
    dataset = fixtures.separable_dataset(num_train=100)
    config = fixtures.tiny_config(noise=0.5, steps=20, checkpoint_every=7, eval_every=7,
                                    **settings)
    whole = fixtures.final_weights(config, dataset, self.create_tempdir().full_path)
    split_dir = self.create_tempdir().full_path
    train.train_and_evaluate(Config(**{**config.__dict__, 'steps': 7}), split_dir, dataset)
    self.assertTrue(os.path.exists(os.path.join(split_dir, 'checkpoints')))
    split = fixtures.final_weights(config, dataset, split_dir)
    for w, s in zip(whole, split):
      self.assertAllEqual(w, s)

  def test_dp_reports_epsilon(self):
    dataset = fixtures.separable_dataset(num_train=100)
    config = fixtures.tiny_config(steps=20, aggregator='dp', clip_norm=1.0,
                                    noise_multiplier=1.0)
    metrics = train.train_and_evaluate(config, self.create_tempdir().full_path, dataset)
    self.assertAllClose(metrics['dp/epsilon'], aggregators.dp_epsilon(100, 20, 20, 1.0, 1e-5))


class SettingsTest(parameterized.TestCase):

  @parameterized.parameters(
      ({'aggregator': 'median', 'winsor_c': 2},
       '--winsor_c=2 is a setting of --aggregator=winsorize, but --aggregator=median'),
      ({'aggregator': 'trimmed_mean'}, 'trimmed_mean needs k >= 1 values dropped a side (got '
                                       '--trim_k=0)'),
      ({'aggregator': 'trimmed_mean', 'trim_k': 10},
       'trimmed_mean needs 1 <= k < batch size / 2 (got --trim_k=10, batch size 20)'),
      ({'aggregator': 'l2clip'}, 'l2clip needs clip_norm > 0 (got --clip_norm=0)'),
      ({'aggregator': 'l2clip', 'clip_norm': 1.0, 'noise_multiplier': 1.0},
       '--noise_multiplier=1 is a setting of --aggregator=dp, but --aggregator=l2clip'),
      ({'aggregator': 'median', 'batch_size': 0}, 'the median needs a minibatch'),
      ({'aggregator': 'median', 'winsor_impl': 'reference'},
       '--winsor_impl=reference is for winsorize'),
      ({'aggregator': 'nope'}, '--aggregator=nope must be one of'),
      ({'winsor_c': 50}, '--winsor_c=50 must be in [0, 50)'),
  )
  def test_bad_settings_are_refused_in_one_line(self, settings, message):
    with self.assertRaisesRegex(UserInputError, re.escape(message)):
      fixtures.tiny_config(**settings)

  @parameterized.parameters(
      ('winsorize', {'c': 60}, 'winsorize: c=60 must be in [0, 50)'),
      ('trimmed_mean', {'k': 0}, 'trimmed_mean needs k >= 1 values dropped a side (got k=0)'),
      ('mean', {'c': 2}, 'mean takes no setting c (its settings: none)'),
      ('l2clip', {}, 'l2clip needs clip_norm > 0 (got clip_norm=None)'),
      ('dp', {'clip_norm': 1.0, 'delta': 2.0}, 'dp: delta=2.0 must be in (0, 1)'),
      ('winsorise', {}, "no aggregator 'winsorise'; the aggregators are mean, winsorize"),
  )
  def test_get_refuses_bad_settings_in_one_line(self, name, settings, message):
    with self.assertRaisesRegex(UserInputError, re.escape(message)):
      aggregators.get(name, **settings)

  def test_the_registry_is_what_the_flags_offer(self):
    self.assertEqual(tuple(aggregators.REGISTRY), config_lib.AGGREGATORS)
    self.assertEqual(aggregators.get('winsorize', c=2).values, {'c': 2, 'impl': 'fast'})
    self.assertEqual(aggregators.get('dp', clip_norm=1.0, noise_multiplier=1.1).describe(),
                     'dp C=1 σ=1.1')
    self.assertFalse(aggregators.get('winsorize').needs_per_example)
    self.assertTrue(aggregators.get('median').needs_per_example)

  @parameterized.parameters(
      ({}, 'mean (SGD)', 'mean (SGD)'),
      ({'learning_rate': 0.01}, 'mean (SGD) lr=0.01', 'mean (SGD)'),
      ({'aggregator': 'mean', 'learning_rate': 0.005}, 'mean (SGD) lr=0.005', 'mean (SGD)'),
      ({'winsor_c': 2.0}, 'winsorize c=2', 'winsorize c=2'),
      ({'aggregator': 'trimmed_mean', 'trim_k': 4}, 'trimmed_mean k=4', 'trimmed_mean k=4'),
      ({'aggregator': 'l2clip', 'clip_norm': 10.0}, 'l2clip C=10', 'l2clip C=1'),
      ({'aggregator': 'dp', 'clip_norm': 1.0, 'noise_multiplier': 0.5}, 'dp C=1 σ=0.5',
       'dp C=1 σ=1'),
      ({'aggregator': 'rm3', 'learning_rate': 0.05}, 'rm3 lr=0.05', 'rm3'),
  )
  def test_settings_are_named_and_share_the_step_time_of_what_does_the_same_work(
      self, settings, name, cost_name):
    config = fixtures.tiny_config(**settings)
    self.assertEqual(aggregators.describe_run(config), name)
    self.assertEqual(aggregators.step_cost_setting(config), cost_name)
