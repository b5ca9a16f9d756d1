"""Per-example gradients against a Python loop and a float64 NumPy derivation."""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

from cg_tf import gradients
from cg_tf import model as model_lib
from tests import reference


def random_model(hidden, seed, num_inputs=6, num_classes=4):
  model = model_lib.build_mlp(num_inputs, hidden, num_classes, 'paper', seed)
  rng = np.random.default_rng(seed)
  for v in model.trainable_variables:  # nonzero biases exercise their gradients
    v.assign(rng.normal(0, 0.5, v.shape).astype(np.float32))
  return model


def batch(seed, size, num_inputs=6, num_classes=4):
  rng = np.random.default_rng(seed + 100)
  return (tf.constant(rng.normal(size=(size, num_inputs)), tf.float32),
          tf.constant(rng.integers(0, num_classes, size), tf.int32))


class PerExampleGradientsTest(parameterized.TestCase, tf.test.TestCase):

  @parameterized.product(hidden=[(5,), (7, 3, 5)], size=[1, 3, 16], seed=[0, 1])
  def test_matches_float64_derivation(self, hidden, size, seed):
    model = random_model(hidden, seed)
    x, y = batch(seed, size)
    expected = reference.mlp_per_example_gradients(
        [(layer.kernel.numpy(), layer.bias.numpy()) for layer in model.layers], x.numpy(),
        y.numpy())
    got = gradients.per_example_gradients(model, gradients.per_example_loss, x, y,
                                          fallback_to_while_loop=False)
    self.assertLen(got, len(expected))
    for g, e in zip(got, expected):
      self.assertAllClose(g, e, rtol=1e-4, atol=1e-5)

  def test_matches_python_loop(self):
    model = random_model((8, 8), 3)
    x, y = batch(3, 10)
    got = gradients.per_example_gradients(model, gradients.per_example_loss, x, y,
                                          fallback_to_while_loop=False)
    for e in range(10):
      with tf.GradientTape() as tape:
        loss = gradients.per_example_loss(y[e:e + 1], model(x[e:e + 1]))[0]
      for g, single in zip(got, tape.gradient(loss, model.trainable_variables)):
        self.assertAllClose(g[e], single, rtol=1e-5, atol=1e-6)

  @parameterized.parameters(1, 7)
  def test_a_keras_loss_works(self, size):
    # Keras losses take (y_true, y_pred); with reduction=None they are per-example.
    model = random_model((5, 4), 2)
    x, y = batch(2, size)
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    got = gradients.per_example_gradients(model, keras_loss, x, y)
    expected = reference.mlp_per_example_gradients(
        [(layer.kernel.numpy(), layer.bias.numpy()) for layer in model.layers], x.numpy(),
        y.numpy())
    for g, e in zip(got, expected):
      self.assertAllClose(g, e, rtol=1e-4, atol=1e-5)

  def test_sum_is_batch_gradient(self):
    model = random_model((8,), 4)
    x, y = batch(4, 32)
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(gradients.per_example_loss(y, model(x)))
    batch_grads = tape.gradient(loss, model.trainable_variables)
    per_example = gradients.per_example_gradients(model, gradients.per_example_loss, x, y)
    for g, b in zip(per_example, batch_grads):
      self.assertAllClose(tf.reduce_sum(g, axis=0) / 32, b, rtol=1e-5, atol=1e-6)

  @parameterized.parameters(1.0, 0.01)
  def test_dense_factors_are_outer_products(self, loss_scale):
    model = random_model((7, 5), 5)
    x, y = batch(5, 9)
    expected = reference.mlp_per_example_gradients(
        [(layer.kernel.numpy(), layer.bias.numpy()) for layer in model.layers], x.numpy(),
        y.numpy())
    losses, logits, factors = gradients.dense_per_example_factors(model, x, y, loss_scale)
    self.assertAllClose(logits, model(x))
    self.assertAllClose(losses, gradients.per_example_loss(y, model(x)))
    for i, (layer, a, delta) in enumerate(factors):
      self.assertIs(layer, model.layers[i])
      self.assertAllClose(tf.einsum('bi,bo->bio', a, delta), expected[2 * i] * loss_scale,
                          rtol=1e-4, atol=1e-6)
      self.assertAllClose(delta, expected[2 * i + 1] * loss_scale, rtol=1e-4, atol=1e-6)

  def test_dense_factors_reject_other_layers(self):
    import keras  # pylint: disable=g-import-not-at-top
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.1), keras.layers.Dense(2)])
    with self.assertRaises(TypeError):
      gradients.dense_per_example_factors(model, tf.zeros([2, 4]), tf.zeros([2], tf.int32))


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
