"""Per-example gradients, layer by layer, against a float64 GradientTape per example."""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

from cg_tf import gradients
from cg_tf import model as model_lib
from cg_tf.errors import UserInputError
from tests import fixtures
from tests import reference


def recorded(model, x, y, scale=1.0):
  """The model's PerExampleGradients of its summed softmax cross-entropy times `scale`."""
  with tf.GradientTape() as tape:
    with gradients.recording(model) as record:
      logits = model(x)
    loss = tf.reduce_sum(gradients.per_example_loss(y, logits)) * scale
  return record.gradients(tape, loss)


def dense_values(v):
  """[B, *shape]: a VariableGradients' values with its rows, if any, scattered in place."""
  values = v.values().numpy().astype(np.float64)
  if v.rows is None:
    return values
  full = np.zeros((v.batch_size, *v.shape), np.float64)
  for row, index in enumerate(v.rows.numpy()):
    full[:, index] += values[:, row]
  return full


class ZooTest(parameterized.TestCase, tf.test.TestCase):
  """Every layer rule, and the vectorized_map fallback, on the model zoo of tests/fixtures.py."""

  def float64_reference(self, name, x, y):
    return reference.per_example_gradients_float64(fixtures.zoo_model(name, 'float64'), x, y)

  @parameterized.product(name=fixtures.ZOO, size=[1, 12])
  def test_values_match_a_tape_per_example(self, name, size):
    x, y = fixtures.zoo_batch(name, size)
    per_example = recorded(fixtures.zoo_model(name), x, y)
    expected = self.float64_reference(name, x, y)
    got = list(per_example)
    self.assertLen(got, len(expected))
    for v, e in zip(got, expected):
      self.assertAllClose(dense_values(v), e, rtol=1e-4, atol=1e-5)

  @parameterized.parameters(*fixtures.ZOO)
  def test_reductions_match_float64(self, name):
    x, y = fixtures.zoo_batch(name, 12)
    model = fixtures.zoo_model(name)
    per_example = recorded(model, x, y)
    expected = self.float64_reference(name, x, y)
    flat = np.concatenate([e.reshape(12, -1) for e in expected], axis=1)
    weights = np.random.default_rng(1).uniform(0, 1, 12)
    self.assertAllClose(per_example.squared_norms(), (flat ** 2).sum(axis=1), rtol=1e-4)
    for got, e in zip(per_example.weighted_sums(tf.constant(weights, tf.float32)), expected):
      self.assertAllClose(got, np.tensordot(weights, e, axes=1), rtol=1e-4, atol=1e-5)
    totals = [e.sum(axis=0) for e in expected]
    alignment = flat @ np.concatenate([t.reshape(-1) for t in totals])
    self.assertAllClose(per_example.alignment([tf.constant(t, tf.float32) for t in totals]),
                        alignment, rtol=1e-4, atol=1e-6 * np.abs(alignment).max())
    gram = flat @ flat.T
    # float32 per-example values: their products carry 1e-7 of the largest ones.
    self.assertAllClose(per_example.gram(), gram, rtol=1e-4, atol=1e-6 * np.abs(gram).max())
    for kind, f in (('value', lambda g: g), ('square', np.square)):
      for got, e in zip(per_example.sums(kind, tf.constant(weights, tf.float32)), expected):
        self.assertAllClose(got, np.tensordot(weights, f(e), axes=1), rtol=1e-4, atol=1e-5)
    # The sign of a value within rounding of 0 is float32's own: counted from the values.
    for kind, f in (('sign', np.sign), ('nonzero', lambda g: np.abs(np.sign(g)))):
      for got, v in zip(per_example.sums(kind, tf.constant(weights, tf.float32)), per_example):
        self.assertAllClose(got, np.tensordot(weights, f(dense_values(v)), axes=1), rtol=1e-5,
                            atol=1e-5)

  @parameterized.parameters(*fixtures.ZOO)
  def test_vectorized_map_everywhere_gives_the_same_gradients(self, name):
    x, y = fixtures.zoo_batch(name, 7)
    model = fixtures.zoo_model(name)
    by_rules = recorded(model, x, y)
    with gradients.vectorized_map_everywhere():
      by_vectorized_map = recorded(model, x, y)
    for layer in by_vectorized_map.layers:
      self.assertIs(gradients.rule_for(layer.layer), gradients.RULES.get(
          type(layer.layer), gradients.VECTORIZED_MAP))
      self.assertNotIsInstance(layer, (gradients.DenseGradients, gradients.ConvGradients))
    for a, b in zip(by_rules, by_vectorized_map):
      self.assertAllClose(dense_values(a), dense_values(b), rtol=1e-5, atol=1e-6)

  def test_dense_kernel_is_kept_as_outer_factors(self):
    x, y = fixtures.zoo_batch('dense', 5)
    per_example = recorded(fixtures.zoo_model('dense'), x, y)
    kinds = [type(layer).__name__ for layer in per_example.layers]
    self.assertEqual(kinds, ['DenseGradients'] * 3)
    kernel = per_example.layers[0].variables[0]
    self.assertIsNotNone(kernel.outer)
    self.assertEqual(kernel.outer[0].shape, (5, 6))
    self.assertEqual(kernel.outer[1].shape, (5, 5))

  def test_a_shared_layer_sums_its_calls(self):
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, activation='tanh')
    model = keras.Model(inputs, keras.layers.Dense(3)(shared(shared(inputs))))
    x, y = fixtures.zoo_batch('dense', 6)
    x = x[:, :4]
    per_example = recorded(model, x, y)
    for v, (e,) in zip(per_example, [[g] for g in _loop_gradients(model, x, y)]):
      self.assertAllClose(dense_values(v), e, rtol=1e-4, atol=1e-5)

  def test_a_layer_called_as_inputs_keyword(self):
    dense = keras.layers.Dense(3)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, dense(inputs=inputs))
    x, y = fixtures.zoo_batch('dense', 4)
    per_example = recorded(model, x[:, :4], y)
    for v, e in zip(per_example, _loop_gradients(model, x[:, :4], y)):
      self.assertAllClose(dense_values(v), e, rtol=1e-4, atol=1e-5)

  def test_batch_normalization_is_refused_before_any_step(self):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              keras.layers.BatchNormalization(name='bn')])
    with self.assertRaisesRegex(UserInputError, "layer 'bn' \\(BatchNormalization\\) "
                                'normalises with the statistics of the batch.*GroupNormalization '
                                'or LayerNormalization'):
      gradients.check_model(model)
    model.get_layer('bn').trainable = False
    gradients.check_model(model)

  def test_an_uncalled_layer_is_named(self):

    class Partial(keras.Model):

      def __init__(self):
        super().__init__()
        self.used, self.unused = keras.layers.Dense(2), keras.layers.Dense(2, name='unused')

      def call(self, x):
        return self.used(x)

    model = Partial()
    model(np.zeros((1, 3), np.float32))
    model.unused.build((None, 3))
    with self.assertRaisesRegex(UserInputError, 'no per-example gradient for .*kernel'):
      recorded(model, np.zeros((2, 3), np.float32), np.zeros(2, np.int32))

  def test_recording_leaves_the_layers_as_they_were(self):
    model = fixtures.zoo_model('conv2d')
    x, y = fixtures.zoo_batch('conv2d', 3)
    before = model(x)
    recorded(model, x, y)
    for layer in model.layers:
      self.assertNotIn('call', layer.__dict__)
    self.assertAllEqual(model(x), before)


def _loop_gradients(model, x, y):
  """[batch, *shape] per variable by one float32 tape per example (the layers' own ops)."""
  out = [[] for _ in model.trainable_variables]
  for e in range(len(y)):
    with tf.GradientTape() as tape:
      loss = gradients.per_example_loss(y[e:e + 1], model(x[e:e + 1]))[0]
    for grads, g in zip(out, tape.gradient(loss, model.trainable_variables)):
      grads.append(g.numpy())
  return [np.stack(g) for g in out]


class PerExampleGradientsTest(parameterized.TestCase, tf.test.TestCase):
  """The whole-model tf.vectorized_map definition (the reference path)."""

  @parameterized.product(hidden=[(5,), (7, 3, 5)], size=[1, 3, 16], seed=[0, 1])
  def test_matches_float64_derivation(self, hidden, size, seed):
    model = fixtures.random_model(hidden, seed)
    x, y = fixtures.batch(seed, size)
    expected = reference.mlp_per_example_gradients(
        [(layer.kernel.numpy(), layer.bias.numpy()) for layer in model.layers], x.numpy(),
        y.numpy())
    got = gradients.per_example_gradients(model, gradients.per_example_loss, x, y,
                                          fallback_to_while_loop=False)
    self.assertLen(got, len(expected))
    for g, e in zip(got, expected):
      self.assertAllClose(g, e, rtol=1e-4, atol=1e-5)

  @parameterized.parameters(1, 7)
  def test_a_keras_loss_works(self, size):
    # Keras losses take (y_true, y_pred); with reduction=None they are per-example.
    model = fixtures.random_model((5, 4), 2)
    x, y = fixtures.batch(2, size)
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    got = gradients.per_example_gradients(model, keras_loss, x, y)
    expected = reference.mlp_per_example_gradients(
        [(layer.kernel.numpy(), layer.bias.numpy()) for layer in model.layers], x.numpy(),
        y.numpy())
    for g, e in zip(got, expected):
      self.assertAllClose(g, e, rtol=1e-4, atol=1e-5)

  def test_the_mlp_rules_match_the_mlp_derivation(self):
    model = fixtures.random_model((7, 5), 5)
    x, y = fixtures.batch(5, 9)
    expected = reference.mlp_per_example_gradients(
        [(layer.kernel.numpy(), layer.bias.numpy()) for layer in model.layers], x.numpy(),
        y.numpy())
    for scale in (1.0, 0.01):
      for v, e in zip(recorded(model, x, y, scale), expected):
        self.assertAllClose(v.values(), e * scale, rtol=1e-4, atol=1e-6)


class ModelTest(tf.test.TestCase):

  def test_paper_init_spread_and_zero_biases(self):
    model = model_lib.build_mlp(784, (2048,), 10, 'paper', 0)
    kernel = model.layers[0].kernel.numpy()
    self.assertAllClose(kernel.std(), 2 / np.sqrt(784 + 2048), rtol=0.01)
    self.assertAllClose(kernel.mean(), 0.0, atol=1e-3)
    self.assertAllEqual(model.layers[0].bias.numpy(), np.zeros(2048))
    self.assertEqual(model.output_shape, (None, 10))

  def test_seed_determines_init(self):
    a = model_lib.build_mlp(10, (4,), 3, 'glorot_uniform', 1).get_weights()
    b = model_lib.build_mlp(10, (4,), 3, 'glorot_uniform', 1).get_weights()
    c = model_lib.build_mlp(10, (4,), 3, 'glorot_uniform', 2).get_weights()
    self.assertAllEqual(a[0], b[0])
    self.assertNotAllClose(a[0], c[0])

  def test_cnn(self):
    model = model_lib.build('cnn', 784, (), 10, 'paper', 0)
    self.assertEqual([layer.name for layer in model.layers if layer.trainable_weights],
                     ['conv_1', 'conv_2', 'hidden_1', 'logits'])
    self.assertEqual(model.count_params(), 320 + 18_496 + 204_928 + 1_290)
    self.assertEqual(model.output_shape, (None, 10))
    conv = model.get_layer('conv_2').kernel.numpy()
    # Keras' fans of a 3x3 convolution from 32 to 64 channels: 9 * 32 and 9 * 64.
    self.assertAllClose(conv.std(), 2 / np.sqrt(9 * 32 + 9 * 64), rtol=0.02)
    self.assertAllEqual(model.get_layer('conv_1').bias.numpy(), np.zeros(32))
    self.assertEqual(model(np.zeros((2, 784), np.float32)).shape, (2, 10))
