"""Losses and per-example gradients.

Two ways to the same numbers: `per_example_gradients` works for any Keras
model through `tf.vectorized_map`; `dense_per_example_factors` exploits that a
Dense layer's per-example kernel gradient is the outer product of its input
activation and the back-propagated error, so a stack of Dense layers needs one
ordinary backward pass and no [batch, ...] copy of the weights.
"""

from typing import Callable, List, Tuple

import keras
import tensorflow as tf


def per_example_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  """Softmax cross-entropy. int labels [batch], logits [batch, classes] -> [batch].

  Keras' argument order (y_true, y_pred): it is what
  keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
  computes.
  """
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def per_example_gradients(model: keras.Model,
                          loss_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
                          x: tf.Tensor, y: tf.Tensor,
                          fallback_to_while_loop: bool = True) -> List[tf.Tensor]:
  """Gradients of each example's own loss, by `tf.vectorized_map`.

  Args:
    model: maps [batch, ...] inputs to [batch, classes] logits.
    loss_fn: (labels [batch], logits [batch, classes]) -> losses [batch], in
      Keras' (y_true, y_pred) order, e.g. a Keras loss with reduction=None.
    x: [batch, ...] inputs.
    y: [batch] labels.
    fallback_to_while_loop: passed to tf.vectorized_map; tests set False so
      that an op without a vectorized rule fails instead of silently looping.

  Returns:
    One tensor [batch, *variable.shape] per `model.trainable_variables`: the
    gradient of loss_fn for that example alone (not divided by the batch size).
  """
  variables = model.trainable_variables

  def one_example(example):
    xe, ye = example
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(loss_fn(ye[tf.newaxis], model(xe[tf.newaxis])))
    return tape.gradient(loss, variables)

  return tf.vectorized_map(one_example, (x, y), fallback_to_while_loop=fallback_to_while_loop)


def dense_per_example_factors(
    model: keras.Sequential, x: tf.Tensor, y: tf.Tensor, loss_scale: float = 1.0
) -> Tuple[tf.Tensor, tf.Tensor, List[Tuple[keras.layers.Dense, tf.Tensor, tf.Tensor]]]:
  """Inputs and errors of each Dense layer, from one forward and backward pass.

  For example e and Dense layer z = a @ W + b, the gradient of loss_e with
  respect to W is outer(a_e, delta_e) and with respect to b is delta_e, where
  delta_e = d loss_e / d z_e. Differentiating the *sum* of the per-example
  losses with respect to z yields every delta_e at once, because z_e depends
  on example e alone.

  Args:
    model: a keras.Sequential of Dense layers (any elementwise activations).
    x: [batch, inputs].
    y: [batch] int labels.
    loss_scale: multiplies every loss (1 / batch for the minibatch mean).

  Returns:
    (losses [batch] unscaled, logits [batch, classes],
     [(layer, a [batch, fan_in], delta [batch, fan_out])]).

  Raises:
    TypeError: the model has a layer other than Dense.
  """
  layers = model.layers
  if not all(isinstance(layer, keras.layers.Dense) for layer in layers):
    raise TypeError('dense_per_example_factors needs a Sequential of Dense layers')
  with tf.GradientTape() as tape:
    activation, inputs, preactivations = x, [], []
    for layer in layers:
      inputs.append(activation)
      z = tf.matmul(activation, layer.kernel) + layer.bias
      tape.watch(z)
      preactivations.append(z)
      activation = layer.activation(z)
    losses = per_example_loss(y, activation)
    total = tf.reduce_sum(losses) * loss_scale
  deltas = tape.gradient(total, preactivations)
  return losses, activation, list(zip(layers, inputs, deltas))
