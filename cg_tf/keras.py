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

`TrainingSetRecord` is a callback that measures, for a model trained by `fit`
on a training set with known corrupt labels, what run.py measures: when each
example is first learned, pristine and corrupt accuracy, forgetting, and
coherence.
"""

from typing import Dict, Optional

import keras
import numpy as np
import tensorflow as tf

from cg_tf import aggregators
from cg_tf import distribute
from cg_tf import gradients
from cg_tf import learning
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


class TrainingSetRecord(keras.callbacks.Callback):
  """run.py's per-example record and label-noise measurements, for a model trained with fit.

  At step 0 (if training starts there), the authors' log-spaced steps (0-9,
  every 10 to 90, every 100 to 900, every 1,000 to 9,000, then every 10,000),
  every `eval_every` steps and the last step, it evaluates the model on the
  whole training set, against its training labels, and on the test set, and:
  - keeps each example's first-learned and learned-since steps, as run.py's
    examples.npz has them (`examples_record()`, `save(path)`);
  - counts each example's forgetting events between consecutive evaluations
    (fitted at one, not at the next). run.py counts them at every minibatch
    presentation instead (Toneva et al.), which needs the examples of each
    batch; `fit` does not show a callback those;
  - writes run.py's scalars to TensorBoard under `log_dir`: train/,
    train_pristine/, train_corrupt/ (accuracy and loss against the training
    labels), train_clean/accuracy, test/, overfit, and
    train/most_common_prediction (the share of training examples given the
    most common class: 1.0 once the network has collapsed to one class);
  - with `coherence_every`, also m-coherence (whole, pristine, corrupt),
    per-example coherence and GSNR over the whole training set
    (coherence.Recorder, through the per-layer rules of gradients.py) at the
    same kind of schedule, as `coherence/...` scalars and `coherence_record()`.

  The model must output logits; the losses are softmax cross-entropies.

  Args:
    x: [n, ...] the training inputs, as the model takes them.
    labels: int [n] the training labels (noisy).
    clean_labels: int [n] the labels before the noise; `corrupt` is where
      they differ.
    test_data: (x_test [m, ...], y_test [m]).
    noise: the share of labels that were permuted (for the §3.3 overfit).
    log_dir: where the TensorBoard scalars go; None writes none.
    eval_every: evaluate also every this many steps.
    batch_size: examples per forward pass of an evaluation.
    coherence_every: measure coherence every this many steps (0: off).
  """

  def __init__(self, x, labels, clean_labels, test_data, noise: float,
               log_dir: Optional[str] = None, eval_every: int = 10_000, batch_size: int = 1000,
               coherence_every: int = 0):
    super().__init__()
    from cg_tf import data as data_lib  # pylint: disable=g-import-not-at-top
    x_test, y_test = test_data
    self.noisy = data_lib.NoisyDataset(
        data_lib.Dataset(x, np.asarray(clean_labels, np.int32), x_test,
                         np.asarray(y_test, np.int32)),
        np.asarray(labels, np.int32), np.arange(len(labels)))
    self.noise, self.eval_every, self.batch_size = noise, eval_every, batch_size
    self.coherence_every = coherence_every
    self.writer = tf.summary.create_file_writer(log_dir) if log_dir else None
    num = len(labels)
    self.first_learned_step = np.full(num, -1, np.int64)
    self.learned_since_step = np.full(num, -1, np.int64)
    self.forgetting_events = np.zeros(num, np.int32)
    self._fitted = None
    self._steps = frozenset()
    self._coherence_steps = frozenset()
    self._coherence = None
    self.metrics: Dict[str, float] = {}

  def on_train_begin(self, logs=None):
    from cg_tf import schedule  # pylint: disable=g-import-not-at-top
    start = int(self.model.optimizer.iterations.numpy())
    total = start + self.params['epochs'] * self.params['steps']
    self._steps = frozenset(schedule.evaluation_steps(total, self.eval_every, total))
    self._coherence_steps = frozenset(schedule.decomposition_steps(
        total, self.coherence_every, 10))
    if start in self._steps or start in self._coherence_steps:
      self._measure(start)

  def on_train_batch_end(self, batch, logs=None):
    step = int(self.model.optimizer.iterations.numpy())
    if step in self._steps or step in self._coherence_steps:
      self._measure(step)

  def _losses_and_predictions(self, x, labels):
    losses, predictions = [], []
    for start in range(0, len(labels), self.batch_size):
      logits = self.model(x[start:start + self.batch_size], training=False)
      losses.append(gradients.per_example_loss(labels[start:start + self.batch_size],
                                               logits).numpy())
      predictions.append(np.argmax(logits.numpy(), axis=-1))
    return np.concatenate(losses), np.concatenate(predictions)

  def _measure(self, step: int):
    from cg_tf import train  # pylint: disable=g-import-not-at-top
    noisy = self.noisy
    if step in self._steps:
      train_loss, train_prediction = self._losses_and_predictions(noisy.data.train_images,
                                                                  noisy.train_labels)
      test_loss, test_prediction = self._losses_and_predictions(noisy.data.test_images,
                                                                noisy.data.test_labels)
      metrics, fitted = train.label_noise_metrics(noisy, self.noise, train_loss,
                                                  train_prediction, test_loss, test_prediction)
      self.first_learned_step, self.learned_since_step = learning.learning_times(
          self.first_learned_step, self.learned_since_step, fitted, step)
      if self._fitted is not None:
        self.forgetting_events += (self._fitted & ~fitted).astype(np.int32)
      self._fitted = fitted
      self.metrics = {k: float(v) for k, v in metrics.items()}
      self._write(step, self.metrics)
    if step in self._coherence_steps:
      if self._coherence is None:
        from cg_tf import coherence  # pylint: disable=g-import-not-at-top
        self._coherence = coherence.Recorder(
            self.model, noisy.data.train_images, noisy.train_labels, noisy.corrupt,
            self.batch_size, 0, 0, int(max(noisy.train_labels.max(),
                                           noisy.data.train_labels.max())) + 1)
      self._coherence.measure(step)
      self._write(step, self._coherence.scalars())

  def _write(self, step, values):
    if self.writer is None:
      return
    with self.writer.as_default(step=step):
      for name, value in values.items():
        tf.summary.scalar(name, value)
    self.writer.flush()

  def examples_record(self) -> Dict[str, np.ndarray]:
    """run.py's examples.npz fields: label, train_label, corrupt, first_learned_step,
    learned_since_step, and forgetting_events counted between evaluations."""
    return {'label': self.noisy.data.train_labels, 'train_label': self.noisy.train_labels,
            'corrupt': self.noisy.corrupt, 'first_learned_step': self.first_learned_step,
            'learned_since_step': self.learned_since_step,
            'forgetting_events': self.forgetting_events}

  def coherence_record(self) -> Optional[Dict[str, np.ndarray]]:
    """coherence.npz's records (coherence.Recorder.arrays), or None if not measured."""
    return None if self._coherence is None else self._coherence.arrays()

  def save(self, path: str) -> None:
    """Writes examples_record() as a compressed .npz."""
    np.savez_compressed(path, **self.examples_record())
