"""Per-example gradients of any Keras model, layer by layer, never all at once.

A minibatch's per-example gradients are what every rule of aggregators.py
reduces, coordinate by coordinate (winsorize, trimmed mean, median) or example
by example (clipping). Forming them as one [batch, *all parameters] tensor is
what makes per-example methods slow; here each layer type has a rule that
knows its cheapest exact form:

- `Dense`: example e's kernel gradient is outer(a_e, delta_e), its input times
  the error at its pre-activation; nothing of size [batch, fan_in, fan_out]
  is formed (the fast order statistics of winsorize.py stream it);
- `Conv1D`, `Conv2D` (any strides, padding, dilation): the sum over output
  positions of outer(patch, delta), formed for one layer;
- `Embedding`: the error rows scattered onto the rows of the examples' ids,
  restricted to the rows some example of the batch uses;
- `LayerNormalization`, `GroupNormalization`: the normalised input times the
  error, summed over the positions each scale and offset serves;
- any other layer with weights of its own: example by example through
  `tf.vectorized_map` of that layer's own vector-Jacobian product, correct if
  slower; layers without weights (pooling, dropout, flatten, activations)
  pass the error through untouched.

How: while `recording(model)` is active, every layer with weights of its own
has its `call` replaced by its rule's, which computes the layer's output the
way Keras does but keeps what the rule needs (its input, the tensor whose
error it needs). One ordinary backward pass of the loss to those tensors
then gives every example's error at once, because example e's outputs
depend on example e alone. `BatchNormalization` in training mode breaks
that (it normalises with batch statistics) and is refused by `check_model`.

`per_example_gradients` is the definition for tests and for the reference
path: every example's gradient over all parameters by `tf.vectorized_map`.
"""

import contextlib
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from cg_tf.errors import UserInputError


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
  """Gradients of each example's own loss over the whole model, by `tf.vectorized_map`.

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


# ----------------------------------------------------------------------------
# One variable's per-example gradients, in the form a layer rule gives them.


class VariableGradients:
  """Example e's gradient of one variable, for every e of the batch, formed only as asked.

  Three forms:
  - outer: (a [B, m], d [B, n]) with example e's gradient outer(a_e, d_e),
    reshaped to the variable's shape ([m, n] for a Dense kernel);
  - values: [B, *shape] (or, with `rows`, [B, U, *shape[1:]]), formed by a
    function when first asked;
  - rows: int [U], the only rows of the variable that any example's gradient
    touches (an Embedding's ids); `values` then covers those rows, every
    other row of every example's gradient is 0.

  Attributes:
    variable: the tf.Variable.
    shape: the variable's shape.
    batch_size: B, static.
    outer: the factors, or None.
    rows: the rows, or None.
  """

  def __init__(self, variable, batch_size: int, outer=None,
               values: Optional[Callable[[], tf.Tensor]] = None, rows=None):
    self.variable = variable
    self.shape = tf.TensorShape(variable.shape)
    self.batch_size = batch_size
    self.outer = outer
    self.rows = rows
    self._values_fn = values
    self._values = None

  def values(self) -> tf.Tensor:
    """[B, *shape] (or [B, U, *shape[1:]] with rows): every example's gradient."""
    if self._values is None:
      if self._values_fn is not None:
        self._values = self._values_fn()
      else:
        a, d = self.outer
        self._values = tf.reshape(a[:, :, tf.newaxis] * d[:, tf.newaxis, :],
                                  [self.batch_size, *self.shape])
    return self._values

  def flat_values(self) -> tf.Tensor:
    """[B, N]: values() with each example's gradient flattened."""
    return tf.reshape(self.values(), [self.batch_size, -1])

  def scatter(self, compact: tf.Tensor) -> tf.Tensor:
    """A reduction of values() over the batch ([U, ...] with rows) as a [*shape] update."""
    if self.rows is None:
      return tf.reshape(compact, self.shape)
    return tf.tensor_scatter_nd_add(tf.zeros(self.shape, compact.dtype),
                                    self.rows[:, tf.newaxis], compact)

  def at(self, flat_indices: tf.Tensor) -> tf.Tensor:
    """[B, k]: every example's gradient at k flat indices into the variable."""
    if self.outer is not None and self.shape.rank == 2:
      rows, cols = tf.unravel_index(flat_indices, self.shape)
      a, d = self.outer
      return tf.gather(a, rows, axis=1) * tf.gather(d, cols, axis=1)
    dense = self.flat_values() if self.rows is None else tf.reshape(
        tf.transpose(tf.scatter_nd(self.rows[:, tf.newaxis],
                                   tf.transpose(self.values(), [1, 0, *range(2, self.shape.rank
                                                                              + 1)]),
                                   [self.shape[0], self.batch_size, *self.shape[1:]]),
                     [1, 0, *range(2, self.shape.rank + 1)]), [self.batch_size, -1])
    return tf.gather(dense, flat_indices, axis=1)


class LayerGradients:
  """The per-example gradients of one layer's own trainable variables.

  The default methods work from each variable's values(); rules override them
  where a layer's structure gives the same numbers without forming them.

  Attributes:
    layer: the Keras layer.
    variables: [VariableGradients] in the order of layer's own trainable variables.
    batch_size: B.
  """

  def __init__(self, layer, variables: Sequence[VariableGradients], batch_size: int):
    self.layer, self.variables, self.batch_size = layer, list(variables), batch_size

  def squared_norms(self) -> tf.Tensor:
    """float32 [B]: ||example e's gradient over this layer's variables||^2."""
    return tf.add_n([tf.reduce_sum(tf.square(v.flat_values()), axis=1) for v in self.variables])

  def weighted_sums(self, weights: tf.Tensor) -> List[tf.Tensor]:
    """sum_e weights[e] g_e, one [*shape] tensor per variable. weights: float32 [B]."""
    return [v.scatter(tf.tensordot(weights, v.values(), axes=1)) for v in self.variables]

  def alignment(self, totals: Sequence[tf.Tensor], into: tf.Tensor) -> tf.Tensor:
    """`into` [B] plus <totals, g_e> over this layer's variables, one total [*shape] per variable."""
    for v, total in zip(self.variables, totals):
      if v.rows is not None:
        total = tf.gather(total, v.rows)
      into += tf.linalg.matvec(v.flat_values(), tf.reshape(total, [-1]))
    return into

  def sums(self, kind: str, weights: Optional[tf.Tensor] = None) -> List[tf.Tensor]:
    """sum_e weights[e] f(g_e) elementwise, one [*shape] per variable.

    kind: f is 'value' (g), 'square' (g^2), 'sign' (sign g) or 'nonzero' (|sign g|).
    """
    out = []
    for v in self.variables:
      values = _ELEMENTWISE[kind](v.values())
      out.append(v.scatter(tf.reduce_sum(values, axis=0) if weights is None else
                           tf.tensordot(weights, values, axes=1)))
    return out

  def gram(self) -> tf.Tensor:
    """float64 [B, B]: <g_e, g_f> over this layer's variables."""
    return tf.add_n([tf.matmul(flat, flat, transpose_b=True) for flat in
                     (tf.cast(v.flat_values(), tf.float64) for v in self.variables)])


_ELEMENTWISE = {'value': lambda x: x, 'square': tf.square, 'sign': tf.sign,
                'nonzero': lambda x: tf.abs(tf.sign(x))}


class PerExampleGradients:
  """A minibatch's per-example gradients, per trainable variable of a model.

  Built by `Recording.gradients`. Example e's gradient is that of the loss the
  caller differentiated restricted to example e: for a loss that is the
  minibatch mean, g_e / B, with g_e the gradient of e's own loss.

  Attributes:
    layers: [LayerGradients], in model order (layers_with_weights).
    batch_size: B.
  """

  def __init__(self, layers: Sequence[LayerGradients], variables, batch_size: int):
    self.layers, self.batch_size = list(layers), batch_size
    self._by_id = {id(v.variable): v for layer in self.layers for v in layer.variables}
    self._order = list(variables)
    missing = [v.name for v in self._order if id(v) not in self._by_id]
    if missing:
      raise UserInputError(f'no per-example gradient for {", ".join(missing)}: the layers that '
                           'own these variables were not called in the forward pass')

  def variable(self, variable) -> VariableGradients:
    return self._by_id[id(variable)]

  def __iter__(self):
    """The VariableGradients in the order of the model's trainable variables."""
    return (self._by_id[id(v)] for v in self._order)

  def _in_order(self, per_layer: Callable[[LayerGradients], List[tf.Tensor]]) -> List[tf.Tensor]:
    by_id = {}
    for layer in self.layers:
      for v, value in zip(layer.variables, per_layer(layer)):
        by_id[id(v.variable)] = value
    return [by_id[id(v)] for v in self._order]

  def squared_norms(self) -> tf.Tensor:
    """float32 [B]: ||g_e||^2 over every variable."""
    return tf.add_n([layer.squared_norms() for layer in self.layers])

  def weighted_sums(self, weights: tf.Tensor) -> List[tf.Tensor]:
    """sum_e weights[e] g_e per trainable variable, in the model's order. weights: [B]."""
    return self._in_order(lambda layer: layer.weighted_sums(weights))

  def sums(self, kind: str, weights: Optional[tf.Tensor] = None) -> List[tf.Tensor]:
    """LayerGradients.sums per trainable variable, in the model's order."""
    return self._in_order(lambda layer: layer.sums(kind, weights))

  def alignment(self, totals: Sequence[tf.Tensor]) -> tf.Tensor:
    """float32 [B]: <totals, g_e>; totals: one [*shape] per trainable variable, model order."""
    by_id = {id(v): t for v, t in zip(self._order, totals)}
    out = tf.zeros([self.batch_size], tf.float32)
    for layer in self.layers:
      out = layer.alignment([by_id[id(v.variable)] for v in layer.variables], out)
    return out

  def gram(self) -> tf.Tensor:
    """float64 [B, B]: <g_e, g_f> over every variable."""
    out = self.layers[0].gram()
    for layer in self.layers[1:]:
      out += layer.gram()
    return out


# ----------------------------------------------------------------------------
# The layer rules.


class Capture:
  """What one call of a layer keeps for its rule.

  Attributes:
    watched: tensors the loss is differentiated to (e.g. a pre-activation).
    data: anything else the rule needs (its input, the normalised input).
  """

  def __init__(self, watched: Sequence[tf.Tensor], **data):
    self.watched = list(watched)
    self.data = data


class LayerRule:
  """How one layer type is called while recording, and its per-example gradients."""

  def supports(self, layer) -> bool:
    """False for a configuration of the layer type this rule does not cover (the fallback then does)."""
    del layer
    return True

  def call(self, layer, call, args, kwargs) -> Tuple[object, Capture]:
    """The layer's output for `args`, and what the rule keeps.

    Args:
      layer: the layer.
      call: the layer's own call method.
      args, kwargs: what the layer was called with.
    """
    raise NotImplementedError

  def gradients(self, layer, variables, captures: Sequence[Capture],
                errors: Sequence[Sequence[tf.Tensor]], batch_size: int) -> LayerGradients:
    """LayerGradients from each call's capture and the loss's gradient to its watched tensors."""
    raise NotImplementedError


def _first_input(args, kwargs) -> tf.Tensor:
  """The input of a layer called as layer(x) or layer(inputs=x)."""
  return args[0] if args else kwargs['inputs']


def layers_with_weights(model: keras.Model) -> list:
  """The layers of `model` (nested ones too) that hold trainable variables of their own, in
  model order (depth first, each layer's sublayers in order): the layers whose per-example
  gradients a recording gives, in that order."""
  ordered, seen = [], set()

  def visit(layer):
    if id(layer) in seen:
      return
    seen.add(id(layer))
    if own_trainable_variables(layer):
      ordered.append(layer)
    for sublayer in layer._layers:  # pylint: disable=protected-access
      visit(sublayer)

  visit(model)
  return ordered


def own_trainable_variables(layer) -> list:
  """The trainable variables `layer` itself holds, not those of its sublayers."""
  if not layer.trainable:
    return []
  inner = {id(v) for sub in layer._flatten_layers(include_self=False)  # pylint: disable=protected-access
           for v in sub.trainable_variables}
  return [v for v in layer.trainable_variables if id(v) not in inner]


class DenseRule(LayerRule):
  """keras.layers.Dense, any input rank, with or without bias, any activation."""

  def supports(self, layer):
    return not getattr(layer, 'lora_enabled', False) and not getattr(
        layer, 'quantization_mode', None)

  def call(self, layer, call, args, kwargs):
    inputs = _first_input(args, kwargs)
    z = tf.matmul(inputs, layer.kernel)
    if layer.bias is not None:
      z = z + layer.bias
    outputs = layer.activation(z) if layer.activation is not None else z
    return outputs, Capture([z], inputs=inputs)

  def gradients(self, layer, variables, captures, errors, batch_size):
    if len(captures) == 1 and captures[0].data['inputs'].shape.rank == 2:
      return DenseGradients(layer, variables, captures[0].data['inputs'], errors[0][0],
                            batch_size)

    def kernel():
      return tf.add_n([tf.einsum('bti,bto->bio', _positions(c.data['inputs'], batch_size),
                                 _positions(e[0], batch_size)) for c, e in zip(captures, errors)])

    def bias():
      return tf.add_n([_sum_to_batch_and_last(e[0]) for e in errors])

    grads = [VariableGradients(variables[0], batch_size, values=kernel)]
    if layer.bias is not None:
      grads.append(VariableGradients(variables[1], batch_size, values=bias))
    return LayerGradients(layer, grads, batch_size)


def _positions(x: tf.Tensor, batch_size: int) -> tf.Tensor:
  """[B, ..., n] -> [B, positions, n]."""
  return tf.reshape(x, [batch_size, -1, x.shape[-1]])


def _sum_to_batch_and_last(x: tf.Tensor) -> tf.Tensor:
  """[B, ..., n] -> [B, n], summing the middle axes."""
  return tf.reduce_sum(x, axis=list(range(1, x.shape.rank - 1))) if x.shape.rank > 2 else x


class DenseGradients(LayerGradients):
  """A Dense layer called once on [B, fan_in]: example e's gradient is (outer(a_e, d_e), d_e).

  Every method forms what it needs from the factors: ||g_e||^2 = (||a_e||^2 + 1) ||d_e||^2,
  sum_e w_e g_e = (A^T diag(w) D, sum_e w_e d_e), <G, g_e> = a_e^T G_W d_e + <G_b, d_e>.
  """

  def __init__(self, layer, variables, a, d, batch_size):
    grads = [VariableGradients(variables[0], batch_size, outer=(a, d))]
    self.has_bias = layer.bias is not None
    if self.has_bias:
      grads.append(VariableGradients(variables[1], batch_size, values=lambda: d))
    super().__init__(layer, grads, batch_size)
    self.a, self.d = a, d

  def squared_norms(self):
    inputs = tf.reduce_sum(self.a * self.a, axis=1)
    if self.has_bias:
      inputs += 1.0
    return inputs * tf.reduce_sum(self.d * self.d, axis=1)

  def weighted_sums(self, weights):
    weighted = self.d * weights[:, tf.newaxis]
    sums = [tf.matmul(self.a, weighted, transpose_a=True)]
    if self.has_bias:
      sums.append(tf.reduce_sum(weighted, axis=0))
    return sums

  def alignment(self, totals, into):
    into += tf.reduce_sum(tf.matmul(self.a, totals[0]) * self.d, axis=-1)
    if self.has_bias:
      into += tf.linalg.matvec(self.d, totals[1])
    return into

  def sums(self, kind, weights=None):
    # The bias is the kernel row of a constant input 1: one product for both.
    f = _ELEMENTWISE[kind]
    a = tf.concat([self.a, tf.ones_like(self.a[:, :1])], axis=1) if self.has_bias else self.a
    fd = f(self.d) if weights is None else f(self.d) * weights[:, tf.newaxis]
    both = tf.matmul(f(a), fd, transpose_a=True)
    return [both[:-1], both[-1]] if self.has_bias else [both]

  def gram(self):
    a, d = tf.cast(self.a, tf.float64), tf.cast(self.d, tf.float64)
    inputs = tf.matmul(a, a, transpose_b=True)
    if self.has_bias:
      inputs += 1.0
    return inputs * tf.matmul(d, d, transpose_b=True)


class ConvRule(LayerRule):
  """keras.layers.Conv1D and Conv2D: channels_last, one group, any strides, padding, dilation."""

  def supports(self, layer):
    return (layer.data_format == 'channels_last' and layer.groups == 1 and
            not getattr(layer, 'lora_enabled', False) and layer.rank in (1, 2))

  def call(self, layer, call, args, kwargs):
    inputs, padding = _first_input(args, kwargs), layer.padding
    if padding == 'causal':  # as keras.layers.Conv1D does it: pad on the left, then valid
      inputs = tf.pad(inputs, [[0, 0], [layer.dilation_rate[0] * (layer.kernel_size[0] - 1), 0],
                               [0, 0]])
      padding = 'valid'
    z = keras.ops.conv(inputs, layer.kernel, strides=list(layer.strides), padding=padding,
                       dilation_rate=layer.dilation_rate, data_format=layer.data_format)
    if layer.use_bias:
      z = z + layer.bias
    outputs = layer.activation(z) if layer.activation is not None else z
    return outputs, Capture([z], inputs=inputs, padding=padding)

  @staticmethod
  def _patches(layer, inputs, padding):
    """[B, positions, kernel_size] input patches in the order of the flattened kernel."""
    if layer.rank == 1:
      inputs = inputs[:, tf.newaxis]
      sizes, strides, rates = ([1, 1, layer.kernel_size[0], 1], [1, 1, layer.strides[0], 1],
                               [1, 1, layer.dilation_rate[0], 1])
    else:
      sizes, strides, rates = ([1, *layer.kernel_size, 1], [1, *layer.strides, 1],
                               [1, *layer.dilation_rate, 1])
    patches = tf.image.extract_patches(inputs, sizes, strides, rates, padding.upper())
    return tf.reshape(patches, [tf.shape(patches)[0], -1, patches.shape[-1]])

  def gradients(self, layer, variables, captures, errors, batch_size):
    pieces = []
    for capture, error in zip(captures, errors):
      patches = self._patches(layer, capture.data['inputs'], capture.data['padding'])
      pieces.append((patches, tf.reshape(error[0], [batch_size, -1, layer.filters])))
    return ConvGradients(layer, variables, pieces, batch_size)


class ConvGradients(LayerGradients):
  """A convolution's per-example gradients from (patches [B, P, K], errors [B, P, filters]) per call.

  The kernel's per-example values [B, K, filters] are formed once, when first
  asked, and serve the norms and weighted sums as well as the order statistics.
  """

  def __init__(self, layer, variables, pieces, batch_size):
    self.pieces, self.has_bias = pieces, layer.use_bias
    kernel_shape = variables[0].shape

    def kernel():
      flat = tf.add_n([tf.einsum('bpk,bpo->bko', p, d) for p, d in pieces])
      return tf.reshape(flat, [batch_size, *kernel_shape])

    grads = [VariableGradients(variables[0], batch_size, values=kernel)]
    if self.has_bias:
      grads.append(VariableGradients(
          variables[1], batch_size,
          values=lambda: tf.add_n([tf.reduce_sum(d, axis=1) for _, d in pieces])))
    super().__init__(layer, grads, batch_size)

  def alignment(self, totals, into):
    kernel = tf.reshape(totals[0], [-1, totals[0].shape[-1]])
    for p, d in self.pieces:
      into += tf.reduce_sum(tf.matmul(p, kernel) * d, axis=[1, 2])
      if self.has_bias:
        into += tf.reduce_sum(d * totals[1], axis=[1, 2])
    return into


class EmbeddingRule(LayerRule):
  """keras.layers.Embedding: example e's gradient has the error rows at the rows of its ids."""

  def supports(self, layer):
    return not getattr(layer, 'lora_enabled', False) and not getattr(
        layer, 'quantization_mode', None)

  def call(self, layer, call, args, kwargs):
    outputs = call(*args, **kwargs)
    ids = _first_input(args, kwargs)
    return outputs, Capture([outputs], ids=tf.cast(ids, tf.int32))

  def gradients(self, layer, variables, captures, errors, batch_size):
    ids = tf.concat([tf.reshape(c.data['ids'], [batch_size, -1]) for c in captures], axis=1)
    width = variables[0].shape[-1]
    rows_errors = tf.concat([tf.reshape(e[0], [batch_size, -1, width]) for e in errors], axis=1)
    vocabulary, per_example = variables[0].shape[0], ids.shape[1]
    if vocabulary <= batch_size * per_example:
      # Every row may be touched: form the rows of every example.
      def values():
        segments = ids + vocabulary * tf.range(batch_size)[:, tf.newaxis]
        flat = tf.math.unsorted_segment_sum(tf.reshape(rows_errors, [-1, width]),
                                            tf.reshape(segments, [-1]), batch_size * vocabulary)
        return tf.reshape(flat, [batch_size, vocabulary, width])

      grads = VariableGradients(variables[0], batch_size, values=values)
    else:
      # Only the rows some example uses, padded with row 0 to a static count:
      # a padding row's values are 0 and add 0 where they are scattered.
      unique, position = tf.unique(tf.reshape(ids, [-1]))
      count = batch_size * per_example
      rows = tf.pad(unique, [[0, count - tf.shape(unique)[0]]])
      rows = tf.ensure_shape(rows, [count])

      def values():
        segments = tf.reshape(position, [batch_size, per_example]) + count * tf.range(
            batch_size)[:, tf.newaxis]
        flat = tf.math.unsorted_segment_sum(tf.reshape(rows_errors, [-1, width]),
                                            tf.reshape(segments, [-1]), batch_size * count)
        return tf.reshape(flat, [batch_size, count, width])

      grads = VariableGradients(variables[0], batch_size, values=values, rows=rows)
    return EmbeddingGradients(layer, [grads], batch_size, ids, rows_errors)


class EmbeddingGradients(LayerGradients):

  def __init__(self, layer, variables, batch_size, ids, rows_errors):
    super().__init__(layer, variables, batch_size)
    self.ids, self.rows_errors = ids, rows_errors

  def weighted_sums(self, weights):
    vocabulary, width = self.variables[0].shape
    weighted = self.rows_errors * weights[:, tf.newaxis, tf.newaxis]
    return [tf.math.unsorted_segment_sum(tf.reshape(weighted, [-1, width]),
                                         tf.reshape(self.ids, [-1]), vocabulary)]

  def alignment(self, totals, into):
    return into + tf.reduce_sum(tf.gather(totals[0], self.ids) * self.rows_errors, axis=[1, 2])


class NormalizationRule(LayerRule):
  """LayerNormalization (without rms_scaling) and GroupNormalization: scale and offset per feature.

  Output y = xhat * gamma + beta, xhat the input normalised over each
  example's own positions, so example e's gradients are sum xhat_e dy_e
  (gamma) and sum dy_e (beta) over the positions a parameter serves.
  """

  def supports(self, layer):
    return not getattr(layer, 'rms_scaling', False)

  def call(self, layer, call, args, kwargs):
    outputs = call(*args, **kwargs)
    inputs = _first_input(args, kwargs)
    return outputs, Capture([outputs], normalized=tf.stop_gradient(self._normalized(layer,
                                                                                   inputs)))

  @staticmethod
  def _normalized(layer, x):
    if isinstance(layer, keras.layers.GroupNormalization):
      axis = layer.axis % x.shape.rank
      channels = x.shape[axis]
      shape = [-1 if i == 0 else x.shape[i] if x.shape[i] is not None else tf.shape(x)[i]
               for i in range(x.shape.rank)]
      grouped = tf.reshape(x, shape[:axis] + [layer.groups, channels // layer.groups] +
                           shape[axis + 1:])
      axes = [i for i in range(1, grouped.shape.rank) if i != axis]
      mean, variance = tf.nn.moments(grouped, axes, keepdims=True)
      return tf.reshape((grouped - mean) * tf.math.rsqrt(variance + layer.epsilon), tf.shape(x))
    axes = [a % x.shape.rank for a in (layer.axis if isinstance(layer.axis, (list, tuple))
                                       else [layer.axis])]
    mean, variance = tf.nn.moments(x, axes, keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + layer.epsilon)

  def gradients(self, layer, variables, captures, errors, batch_size):
    rank = captures[0].data['normalized'].shape.rank
    if isinstance(layer, keras.layers.GroupNormalization):
      kept = [layer.axis % rank]
    else:
      kept = [a % rank for a in (layer.axis if isinstance(layer.axis, (list, tuple))
                                 else [layer.axis])]
    summed = [i for i in range(1, rank) if i not in kept]
    grads, index = [], 0

    def reduce(make):
      return lambda: tf.add_n([tf.reduce_sum(make(c, e[0]), axis=summed)
                               for c, e in zip(captures, errors)])

    if layer.scale:
      grads.append(VariableGradients(variables[index], batch_size,
                                     values=reduce(lambda c, dy: c.data['normalized'] * dy)))
      index += 1
    if layer.center:
      grads.append(VariableGradients(variables[index], batch_size,
                                     values=reduce(lambda c, dy: dy)))
    return LayerGradients(layer, grads, batch_size)


class VectorizedMapRule(LayerRule):
  """Any layer whose output for example e depends on example e alone: its own vector-Jacobian
  product, example by example, by tf.vectorized_map. Correct for any such layer, slower."""

  def call(self, layer, call, args, kwargs):
    outputs = call(*args, **kwargs)
    return outputs, Capture(tf.nest.flatten(outputs), args=args, kwargs=kwargs, call=call,
                            structure=outputs)

  def gradients(self, layer, variables, captures, errors, batch_size):
    per_call = []
    for capture, error in zip(captures, errors):
      per_call.append(self._per_example(variables, capture, error))

    def values_of(i):
      return lambda: tf.add_n([values[i] for values in per_call])

    return LayerGradients(layer, [VariableGradients(v, batch_size, values=values_of(i))
                                  for i, v in enumerate(variables)], batch_size)

  @staticmethod
  def _per_example(variables, capture, error):
    args, kwargs, call = capture.data['args'], capture.data['kwargs'], capture.data['call']
    tensors = [a for a in tf.nest.flatten(args) if tf.is_tensor(a)]

    def one(example):
      inputs, output_errors = example
      filled = iter(inputs)
      example_args = tf.nest.map_structure(
          lambda a: next(filled)[tf.newaxis] if tf.is_tensor(a) else a, args)
      with tf.GradientTape() as tape, _paused():
        outputs = tf.nest.flatten(call(*example_args, **kwargs))
      grads = tape.gradient(outputs, variables,
                            output_gradients=[e[tf.newaxis] for e in output_errors])
      return [tf.zeros(v.shape) if g is None else tf.convert_to_tensor(g)
              for v, g in zip(variables, grads)]

    return tf.vectorized_map(one, (tensors, list(error)))


VECTORIZED_MAP = VectorizedMapRule()
_NORMALIZATION = NormalizationRule()
RULES: Dict[type, LayerRule] = {
    keras.layers.Dense: DenseRule(),
    keras.layers.Conv1D: ConvRule(),
    keras.layers.Conv2D: ConvRule(),
    keras.layers.Embedding: EmbeddingRule(),
    keras.layers.LayerNormalization: _NORMALIZATION,
    keras.layers.GroupNormalization: _NORMALIZATION,
}


def register(layer_class: type, rule: LayerRule) -> None:
  """Makes `rule` give the per-example gradients of layers of exactly `layer_class`."""
  RULES[layer_class] = rule


def rule_for(layer) -> LayerRule:
  """The rule for `layer`: its class's (exact class), or VECTORIZED_MAP.

  Inside `vectorized_map_everywhere()`, VECTORIZED_MAP for every layer.
  """
  rule = RULES.get(type(layer))
  if getattr(_THREAD, 'vectorized_map_everywhere', False) or rule is None or not rule.supports(
      layer):
    return VECTORIZED_MAP
  return rule


def vectorized_map_everywhere():
  """Steps traced inside take every layer's per-example gradients by VECTORIZED_MAP, as a layer
  without a rule of its own gets them (benchmarks and tests of what the rules save)."""
  return _thread_setting('vectorized_map_everywhere', True)


def check_model(model: keras.Model) -> None:
  """Refuses, before any step, layers whose examples have no gradients of their own.

  Raises:
    UserInputError: a trainable BatchNormalization (training mode normalises
      with the batch's statistics, so each example's output depends on the
      others), or a quantized layer.
  """
  for layer in model._flatten_layers(include_self=True):  # pylint: disable=protected-access
    if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
      raise UserInputError(
          f'layer {layer.name!r} (BatchNormalization) normalises with the statistics of the '
          'batch in training, so an example has no gradient of its own; use '
          'GroupNormalization or LayerNormalization instead, or freeze it '
          '(layer.trainable = False runs it in inference mode)')
    if getattr(layer, 'quantization_mode', None) and own_trainable_variables(layer):
      raise UserInputError(f'layer {layer.name!r} is quantized; per-example gradients need '
                           'its float weights')


# ----------------------------------------------------------------------------
# Recording.

_THREAD = threading.local()
_INSTALL_LOCK = threading.Lock()


@contextlib.contextmanager
def _thread_setting(name: str, value):
  """Sets a setting of this thread's recording machinery for the duration."""
  previous = getattr(_THREAD, name, None)
  setattr(_THREAD, name, value)
  try:
    yield
  finally:
    setattr(_THREAD, name, previous)


def _paused():
  """Layer calls inside go straight to the layers (a rule recomputing a layer)."""
  return _thread_setting('recording', None)


class Recording:
  """The layer calls of one forward pass, kept by their rules (see `recording`)."""

  def __init__(self, model):
    self.model = model
    self.calls: Dict[int, Tuple[object, LayerRule, List[Capture]]] = {}

  def _call(self, layer, call, args, kwargs):
    entry = self.calls.get(id(layer))
    if entry is None:
      entry = self.calls[id(layer)] = (layer, rule_for(layer), [])
    _, rule, captures = entry
    outputs, capture = rule.call(layer, call, args, kwargs)
    captures.append(capture)
    return outputs

  def gradients(self, tape: tf.GradientTape, loss: tf.Tensor) -> PerExampleGradients:
    """Every example's gradient of `loss` (recorded on `tape`), per trainable variable.

    Args:
      tape: the tape the forward pass ran under.
      loss: a scalar, a sum over the examples of terms that each depend on
        one example (a minibatch mean, say). Each example's gradient is that
        of its term.

    Raises:
      UserInputError: a trainable variable's layer was not called.
    """
    watched, owners = [], []
    for layer, rule, captures in self.calls.values():
      for capture in captures:
        owners.append(len(capture.watched))
        watched.extend(capture.watched)
    errors = tape.gradient(loss, watched)
    if watched and all(error is None for error in errors):
      raise ValueError('the loss does not depend on the recorded layers: compute it inside the '
                       'GradientTape that the forward pass ran under')
    errors = [tf.zeros_like(w) if e is None else e for w, e in zip(watched, errors)]
    batch_size = None
    layers, start = [], 0
    counts = iter(owners)
    for layer, rule, captures in self.calls.values():
      per_capture = []
      for _ in captures:
        n = next(counts)
        per_capture.append(errors[start:start + n])
        start += n
      batch_size = batch_size or _static_batch(per_capture)
      layers.append(rule.gradients(layer, own_trainable_variables(layer), captures,
                                   per_capture, batch_size))
    order = {id(layer): i for i, layer in enumerate(layers_with_weights(self.model))}
    layers.sort(key=lambda layer: order.get(id(layer.layer), len(order)))
    return PerExampleGradients(layers, self.model.trainable_variables, batch_size)


def _static_batch(per_capture) -> int:
  size = per_capture[0][0].shape[0]
  if size is None:
    raise UserInputError('per-example gradients need a static batch size')
  return int(size)


@contextlib.contextmanager
def recording(model: keras.Model):
  """Records the forward passes of `model` inside, for per-example gradients.

    with tf.GradientTape() as tape:
      with gradients.recording(model) as record:
        loss = tf.reduce_mean(per_example_loss(y, model(x)))
    per_example = record.gradients(tape, loss)

  Args:
    model: the model; every layer with trainable variables of its own is
      recorded by its rule (RULES, else VECTORIZED_MAP).

  Yields:
    A Recording.
  """
  check_model(model)
  layers = layers_with_weights(model)
  record = Recording(model)
  with _INSTALL_LOCK:
    originals = [(layer, layer.__dict__.get('call')) for layer in layers]
    for layer in layers:
      object.__setattr__(layer, 'call', _recorded_call(layer, layer.call))
  try:
    with _thread_setting('recording', record):
      yield record
  finally:
    with _INSTALL_LOCK:
      for layer, original in originals:
        if original is None:
          object.__delattr__(layer, 'call')
        else:
          object.__setattr__(layer, 'call', original)


def _recorded_call(layer, call):
  def recorded(*args, **kwargs):
    record = getattr(_THREAD, 'recording', None)
    if record is None:
      return call(*args, **kwargs)
    return record._call(layer, call, args, kwargs)  # pylint: disable=protected-access
  return recorded
