"""Winsorized SGD, or any other aggregator of per-example gradients, through Keras' own `fit`.

  import keras
  from cg_tf import aggregators
  import cg_tf.keras

  model = cg_tf.keras.with_aggregator(my_model, aggregators.get('winsorize', c=2))
  model.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=['accuracy'])
  model.fit(x_train, y_train, batch_size=100, epochs=10, validation_data=(x_test, y_test))

The returned model trains by the ordinary Keras API (compile with any
optimizer, loss and metrics; fit, evaluate, predict, callbacks, validation
data), for Sequential, Functional and subclassed models built from layers.
Each step:
- computes the compiled loss of the minibatch as Keras does;
- gives the aggregator every example's gradient of it, layer by layer
  (gradients.py), so the update is on the scale of the mean gradient of the
  compiled loss: aggregators.get('mean') is plain `fit`, and winsorize at
  c = 0 equals it. Rules of each example's own loss (median, l2clip, dp) take
  B times its share of the minibatch loss, B the batch size, which is the
  example's own loss under Keras' default mean reduction;
- adds the gradient of the terms that belong to no example (the layers'
  regularisation losses);
- hands the update to the optimizer, so momentum, Adam or weight decay apply
  after the aggregate (the paper uses plain SGD).

Under a tf.distribute strategy (MirroredStrategy: GPUs, or logical CPU devices
in tests) every replica gathers the global minibatch, computes its forward
and backward pass, and aggregates its share, so the numbers do not depend on
the replica count (the same bits on 1, 2 and 4 identical devices).

Each distinct batch shape is traced once with its size known: the
order statistics need it (the size of the last, partial batch differs).
"""

from typing import Optional

import keras
import tensorflow as tf

from cg_tf import aggregators
from cg_tf import distribute
from cg_tf import gradients
from cg_tf.errors import UserInputError


class AggregatedModel(keras.Model):
  """A Keras model whose training step applies an aggregator to per-example gradients.

  Made by `with_aggregator`; `inner` is the model it wraps (use it to save the
  trained network), `aggregator` the rule.
  """

  def __init__(self, inner: keras.Model, aggregator: aggregators.Aggregator, **kwargs):
    super().__init__(name=kwargs.pop('name', f'{inner.name}_{aggregator.name}'), **kwargs)
    self.inner = inner
    self.aggregator = aggregator
    self._aggregator_built = False
    self._global_batch_size = None

  def call(self, inputs, training=None):
    return self.inner(inputs, training=training)

  def _build_aggregator(self):
    """The rule's state and metrics, once, under the model's strategy, before the first step."""
    if self._aggregator_built:
      return
    gradients.check_model(self.inner)
    optimizer = self.optimizer
    if getattr(optimizer, 'loss_scale_factor', None) or isinstance(
        optimizer, keras.optimizers.LossScaleOptimizer):
      raise UserInputError('with_aggregator does not support loss scaling (mixed precision): '
                           'the aggregators compare gradients on their true scale')
    replicas = self.distribute_strategy.num_replicas_in_sync
    if replicas > 1 and any(getattr(optimizer, name, None) for name in
                            ('clipnorm', 'clipvalue', 'global_clipnorm')):
      raise UserInputError('with_aggregator on several replicas: the optimizer\'s clipnorm, '
                           'clipvalue and global_clipnorm would see one replica\'s share of the '
                           'update; clip by the aggregator instead (l2clip)')
    with self.distribute_strategy.scope():
      self.aggregator.build(self.trainable_variables,
                            distribute.runs_on_cpus(self.distribute_strategy))
    self._aggregator_built = True

  def reset_metrics(self):
    super().reset_metrics()
    for metric in self.aggregator.metrics:
      metric.reset_state()

  def train_step(self, data):
    """One aggregated step on the global minibatch `data` (x, y[, sample_weight])."""
    data = _global_batch(data, self._global_batch_size)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    batch = tf.nest.flatten(x)[0].shape[0]
    if batch is None:
      raise UserInputError('with_aggregator needs a static batch size in its training step')
    aggregator = self.aggregator
    if not all(layer.built for layer in self.inner._flatten_layers()):  # pylint: disable=protected-access
      # Built here, on the first trace, when no strategy made fit build it before.
      self(x, training=True)
    self._build_aggregator()
    variables = self.trainable_variables
    record = None
    with tf.GradientTape(persistent=True) as tape:
      if aggregator.needs_per_example:
        with gradients.recording(self.inner) as record:
          y_pred = self(x, training=True)
      else:
        y_pred = self(x, training=True)
      loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                training=True)
      # Keras divides the loss by the replica count, for replicas that each
      # see a share of the batch; every replica here computes the whole batch.
      loss = _unscaled_for_replicas(loss)
      # The layers' regularisation terms belong to no example: their gradient is added whole.
      regularization = tf.add_n([tf.reduce_sum(term) for term in self.losses]
                                ) if self.losses else None
      data_loss = loss if regularization is None else loss - regularization
      # Rules of each example's own loss take B times its share of the mean.
      examples_loss = data_loss * (1.0 if aggregator.per_example_scale == 'mean' else
                                   float(batch))
    self._loss_tracker.update_state(loss, sample_weight=batch)

    update = aggregator.aggregate(aggregators.Minibatch(
        variables=variables, batch_size=batch, step=self.optimizer.iterations,
        mean_gradient=lambda: tape.gradient(loss, variables),
        per_example=lambda: record.gradients(tape, examples_loss),
        vectorized_map=lambda: self._vectorized_map_gradients(x, y, sample_weight)))
    if aggregator.needs_per_example and regularization is not None:
      extra = tape.gradient(regularization, variables)
      update = [u if e is None else u + distribute.only_first_replica(e)
                for u, e in zip(update, extra)]
    self.optimizer.apply_gradients(zip(update, variables))
    # The rule's own metrics are training metrics: not in self.metrics, which evaluate reports.
    return {**self.compute_metrics(x, y, y_pred, sample_weight=sample_weight),
            **{metric.name: metric.result() for metric in aggregator.metrics}}

  def _vectorized_map_gradients(self, x, y, sample_weight):
    """Each example's gradient of the compiled loss of that example alone, by tf.vectorized_map."""
    variables = self.trainable_variables

    def one(example):
      xe, ye, we = tf.nest.map_structure(lambda t: t[tf.newaxis], example)
      with tf.GradientTape() as tape:
        prediction = self(xe, training=True)
        loss = _unscaled_for_replicas(self.compute_loss(x=xe, y=ye, y_pred=prediction,
                                                        sample_weight=we))
        if self.losses:
          loss -= tf.add_n([tf.reduce_sum(term) for term in self.losses])
      return tape.gradient(loss, variables)

    weights = sample_weight if sample_weight is not None else tf.ones(
        [tf.nest.flatten(x)[0].shape[0]])
    return tf.vectorized_map(one, (x, y, weights))

  def make_train_function(self, force=False):
    """Keras' train function, traced once per batch shape with that shape known."""
    if self.train_function is not None and not force:
      return self.train_function
    if self.built and self.trainable_variables:
      # Under a strategy, fit has built the model: the rule's state is made in
      # the strategy's scope, outside any replica (else the first step does it).
      self._build_aggregator()
    strategy = self.distribute_strategy

    @tf.function
    def one_step(data):
      # The global minibatch's size, for the replicas to gather it with a static shape.
      shards = strategy.experimental_local_results(tf.nest.flatten(data)[0])
      self._global_batch_size = (sum(int(t.shape[0]) for t in shards)
                                 if len(shards) == strategy.num_replicas_in_sync else
                                 int(shards[0].shape[0]) * strategy.num_replicas_in_sync)
      outputs = strategy.run(self.train_step, args=(data,))
      # The metrics are the same on every replica (Keras syncs them on read).
      return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], outputs)

    def function(iterator):
      outputs = None
      if isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
        for _ in range(self.steps_per_execution):
          optional = iterator.get_next_as_optional()
          if not optional.has_value():
            break
          outputs = one_step(optional.get_value())
      else:
        for _, data in zip(range(self.steps_per_execution), iterator):
          outputs = one_step(data)
      if outputs is None:
        raise StopIteration
      return outputs

    self.train_function = function
    return function


def with_aggregator(model: keras.Model, aggregator: aggregators.Aggregator,
                    name: Optional[str] = None) -> AggregatedModel:
  """A keras.Model that trains `model` through `fit` with `aggregator`'s update.

  Args:
    model: any Keras model mapping a batch of inputs to predictions; its
      layers' per-example gradients come from gradients.RULES (Dense, Conv1D,
      Conv2D, Embedding, LayerNormalization, GroupNormalization) or, for any
      other layer with weights, tf.vectorized_map. Make it under the
      strategy's scope to train on several replicas.
    aggregator: e.g. aggregators.get('winsorize', c=2).
    name: the returned model's name; by default '<model>_<aggregator>'.

  Returns:
    An AggregatedModel sharing `model`'s layers and weights: compile and fit
    it as any Keras model.

  Raises:
    UserInputError: a layer without per-example gradients (a trainable
      BatchNormalization), named with the usual fix.
  """
  gradients.check_model(model)
  return AggregatedModel(model, aggregator, **({'name': name} if name else {}))


def _global_batch(data, size: Optional[int]):
  """On each replica, the whole global minibatch of `size` examples (replica shards gathered
  in replica order, which is the order of the global batch)."""
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync == 1:
    return data
  return tf.nest.map_structure(
      lambda t: tf.ensure_shape(context.all_gather(t, axis=0), [size, *t.shape[1:]]), data)


def _unscaled_for_replicas(value):
  replicas = tf.distribute.get_strategy().num_replicas_in_sync
  return value if replicas == 1 else value * tf.cast(replicas, value.dtype)
