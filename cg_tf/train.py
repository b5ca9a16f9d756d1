"""The label-noise experiment's training loop: SGD or winsorized SGD, evaluation,
TensorBoard summaries, per-example learning times and checkpoints.

Structure (tensorflow/privacy, uncertainty-baselines): a pure step function
`train_step(images, labels)` that `strategy.run` can call; a compiled loop
`train_steps(n)` running n steps with `tf.range`, drawing minibatches in-graph
from a stateless per-epoch shuffle, so nothing on the Python side changes
inside the loop; evaluation, summaries and checkpoints in eager code between
calls. The step count is `optimizer.iterations`.

Seed scheme: `config.seed` sets Keras' global seed, the kernel initialisers
(model.build_mlp) and the shuffle, which for epoch k is
argsort(stateless_uniform([n], seed=[config.seed, k])): a function of the
epoch, so a resumed run draws the same minibatches without saving iterator
state. The data and the label noise depend on `config.noise_seed` (data.py).
"""

import dataclasses
import logging
import os
import time
from typing import Dict, Optional

import keras
import numpy as np
import tensorflow as tf

from cg_tf import data as data_lib
from cg_tf import decomposition
from cg_tf import gradients
from cg_tf import model as model_lib
from cg_tf import schedule
from cg_tf import winsorize
from cg_tf import workdir as workdir_lib
from cg_tf.config import Config
from cg_tf.errors import UserInputError

log = logging.getLogger('cg_tf')


class Experiment:
  """Model, optimizer, data on the device, and the compiled functions.

  Model, optimizer and per-example state are created under `strategy.scope()`;
  `train_steps` and `evaluate` are the only entry points the loop needs.
  """

  def __init__(self, config: Config, noisy: data_lib.NoisyDataset,
               strategy: Optional[tf.distribute.Strategy] = None):
    self.config = config
    self.noisy = noisy
    self.strategy = strategy or tf.distribute.get_strategy()
    num_train = noisy.num_train
    self.batch_size = config.batch_size or num_train
    if self.batch_size > num_train:
      raise UserInputError(f'--batch_size={config.batch_size} exceeds the {num_train} '
                           'training examples')
    self.steps_per_epoch = num_train // self.batch_size
    with self.strategy.scope():
      self.model = model_lib.build_mlp(noisy.data.train_images.shape[1], config.hidden,
                                       data_lib.NUM_CLASSES, config.init, config.seed)
      self.optimizer = keras.optimizers.SGD(learning_rate=config.learning_rate)
      self.optimizer.build(self.model.trainable_variables)
      # Per-example learning times live in variables so checkpoints carry them.
      self.first_learned_step = tf.Variable(tf.fill([num_train], tf.constant(-1, tf.int64)),
                                            trainable=False, name='first_learned_step')
      self.learned_since_step = tf.Variable(tf.fill([num_train], tf.constant(-1, tf.int64)),
                                            trainable=False, name='learned_since_step')
    self.train_images = tf.Variable(noisy.data.train_images, trainable=False)
    self.train_labels = tf.Variable(noisy.train_labels, trainable=False)
    self.permutation = tf.Variable(tf.range(num_train, dtype=tf.int32), trainable=False)
    self.permutation_epoch = tf.Variable(tf.constant(-1, tf.int64), trainable=False)
    self.batch_loss = keras.metrics.Mean('train_batch/loss')
    self.clipped_fraction = keras.metrics.Mean('train_batch/winsor_clipped_fraction')
    self.num_parameters = sum(int(np.prod(v.shape)) for v in self.model.trainable_variables)

  @property
  def step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def checkpoint(self) -> tf.train.Checkpoint:
    return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                               first_learned_step=self.first_learned_step,
                               learned_since_step=self.learned_since_step)

  def _gradients(self, images: tf.Tensor, labels: tf.Tensor):
    """(gradient per trainable variable, mean loss) of one minibatch."""
    c, batch = float(self.config.winsor_c), tf.cast(tf.shape(labels)[0], tf.float32)
    variables = self.model.trainable_variables
    if c == 0:
      with tf.GradientTape() as tape:
        loss = tf.reduce_mean(gradients.per_example_loss(self.model(images), labels))
      return tape.gradient(loss, variables), loss
    if self.config.winsor_impl == 'reference':
      with tf.GradientTape() as tape:
        loss = tf.reduce_mean(gradients.per_example_loss(self.model(images), labels))
      per_example = gradients.per_example_gradients(self.model, gradients.per_example_loss,
                                                    images, labels)
      # The loss is the minibatch mean, so example e contributes g_e / batch.
      grads = [winsorize.winsorized_sum_reference(g / batch, c) for g in per_example]
      return grads, loss
    losses, factors = gradients.dense_per_example_factors(self.model, images, labels,
                                                          loss_scale=1.0 / self.batch_size)
    by_variable, num_clipped = {}, tf.constant(0, tf.int64)
    for layer, a, delta in factors:
      kernel_sum, kernel_clipped = winsorize.winsorized_outer_sum_and_count(a, delta, c)
      bias_sum, bias_clipped = winsorize.winsorized_sum_and_count(delta, c)
      by_variable[id(layer.kernel)] = kernel_sum
      by_variable[id(layer.bias)] = bias_sum
      num_clipped += kernel_clipped + bias_clipped
    self.clipped_fraction.update_state(
        tf.cast(num_clipped, tf.float32) / (self.num_parameters * self.batch_size))
    return [by_variable[id(v)] for v in variables], tf.reduce_mean(losses)

  def train_step(self, images: tf.Tensor, labels: tf.Tensor) -> None:
    """One (winsorized) SGD step on a minibatch: images [batch, 784], labels [batch]."""
    grads, loss = self._gradients(images, labels)
    self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
    self.batch_loss.update_state(loss)

  @tf.function
  def train_steps(self, num_steps: tf.Tensor) -> None:
    """Runs `num_steps` steps in-graph, continuing from optimizer.iterations."""
    for _ in tf.range(num_steps):
      step = self.optimizer.iterations
      epoch = step // self.steps_per_epoch
      if self.permutation_epoch != epoch:
        uniform = tf.random.stateless_uniform(
            [self.noisy.num_train], seed=tf.stack([tf.cast(self.config.seed, tf.int64), epoch]))
        self.permutation.assign(tf.argsort(uniform, stable=True))
        self.permutation_epoch.assign(epoch)
      start = tf.cast(step % self.steps_per_epoch, tf.int32) * self.batch_size
      # tf.slice with a constant size keeps the batch dimension static.
      indices = tf.slice(self.permutation, [start], [self.batch_size])
      self.strategy.run(self.train_step, args=(tf.gather(self.train_images, indices),
                                               tf.gather(self.train_labels, indices)))

  @tf.function
  def _predict(self, images: tf.Tensor, labels: tf.Tensor):
    logits = self.model(images)
    return (gradients.per_example_loss(logits, labels),
            tf.argmax(logits, axis=-1, output_type=tf.int32))

  def predict(self, images: np.ndarray, labels: np.ndarray):
    """(per-example loss [n], predicted class [n]) as NumPy, in eval batches."""
    losses, predictions = [], []
    for start in range(0, len(labels), self.config.eval_batch_size):
      stop = start + self.config.eval_batch_size
      loss, prediction = self._predict(images[start:stop], labels[start:stop])
      losses.append(loss.numpy())
      predictions.append(prediction.numpy())
    return np.concatenate(losses), np.concatenate(predictions)

  def evaluate(self) -> Dict[str, float]:
    """Metrics of the current model; updates the per-example learning times.

    Returns:
      'split/name' -> value, for the noisy training set, its pristine and
      corrupt parts (against their training labels), the training set against
      its clean labels, the test set, and the §3.3 overfit.
    """
    step, noisy, clean = self.step, self.noisy, self.noisy.data
    train_loss, train_prediction = self.predict(clean.train_images, noisy.train_labels)
    test_loss, test_prediction = self.predict(clean.test_images, clean.test_labels)
    fitted = train_prediction == noisy.train_labels
    corrupt = noisy.corrupt
    metrics = {'train/loss': train_loss.mean(), 'train/accuracy': fitted.mean(),
               'train_clean/accuracy': (train_prediction == clean.train_labels).mean(),
               'test/loss': test_loss.mean(),
               'test/accuracy': (test_prediction == clean.test_labels).mean()}
    for split, mask in (('train_pristine', ~corrupt), ('train_corrupt', corrupt)):
      if mask.any():
        metrics[f'{split}/loss'] = train_loss[mask].mean()
        metrics[f'{split}/accuracy'] = fitted[mask].mean()
    noise = self.config.noise
    metrics['overfit'] = metrics['train/accuracy'] - (
        noise * 0.1 + (1 - noise) * metrics['test/accuracy'])
    first = self.first_learned_step.numpy()
    first[(first < 0) & fitted] = step
    since = self.learned_since_step.numpy()
    since[~fitted] = -1
    since[(since < 0) & fitted] = step
    self.first_learned_step.assign(first)
    self.learned_since_step.assign(since)
    return {k: float(v) for k, v in metrics.items()}

  def examples_record(self) -> Dict[str, np.ndarray]:
    """What examples.npz holds: one entry per training example."""
    return {'label': self.noisy.data.train_labels, 'train_label': self.noisy.train_labels,
            'corrupt': self.noisy.corrupt, 'subset_index': self.noisy.subset,
            'first_learned_step': self.first_learned_step.numpy(),
            'learned_since_step': self.learned_since_step.numpy()}


def _hparams(config: Config) -> Dict[str, object]:
  return {k: (','.join(map(str, v)) if isinstance(v, tuple) else ('' if v is None else v))
          for k, v in dataclasses.asdict(config).items()}


def train_and_evaluate(config: Config, workdir: str,
                       dataset: Optional[data_lib.Dataset] = None,
                       strategy: Optional[tf.distribute.Strategy] = None) -> Dict[str, float]:
  """Runs (or resumes) the label-noise experiment in `workdir`.

  Writes into `workdir`: config.json, TensorBoard event files, examples.npz and
  checkpoints under checkpoints/. Rerunning after a kill resumes from the last
  checkpoint and ends with the same numbers as an uninterrupted run.

  Args:
    config: the experiment.
    workdir: run directory.
    dataset: clean dataset to use instead of loading config.dataset (tests).
    strategy: a tf.distribute strategy; the default strategy if None.

  Returns:
    The metrics of the last evaluation.

  Raises:
    UserInputError: bad data directory, unwritable or mismatched workdir.
  """
  workdir_lib.prepare(workdir, config)
  if dataset is None:
    dataset = data_lib.load(config.dataset, config.data_dir)
  noisy = data_lib.make_noisy(dataset, config.train_size, config.noise, config.noise_seed)
  keras.utils.set_random_seed(config.seed)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  experiment = Experiment(config, noisy, strategy)
  manager = tf.train.CheckpointManager(experiment.checkpoint(),
                                       os.path.join(workdir, 'checkpoints'), max_to_keep=3)
  if manager.latest_checkpoint:
    manager.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    log.info('resuming at step %d from %s', experiment.step, manager.latest_checkpoint)
  recorder = None
  decomp_steps = set(schedule.decomposition_steps(config.steps, config.decomp_every,
                                                  config.decomp_dense_steps))
  if decomp_steps:
    recorder = decomposition.Recorder(
        experiment.model, noisy.data.train_images, noisy.train_labels, noisy.corrupt,
        config.null_worlds, config.noise_seed, config.eval_batch_size,
        config.decomp_sample_examples, config.decomp_sample_weights)
    saved = workdir_lib.read_decomposition(workdir)
    if saved is not None:
      recorder.restore(saved, experiment.step)
  writer = tf.summary.create_file_writer(workdir)
  eval_steps = set(schedule.evaluation_steps(config.steps, config.eval_every,
                                             config.checkpoint_every))
  checkpoint_steps = set(schedule.checkpoint_steps(config.steps, config.checkpoint_every))
  metrics: Dict[str, float] = {}
  log.info('%d training examples (%d corrupt), %d parameters, %d steps of batch %d',
           noisy.num_train, noisy.corrupt.sum(), experiment.num_parameters, config.steps,
           experiment.batch_size)

  def decompose():
    step = experiment.step
    with writer.as_default(step=step):
      for name, value in recorder.measure(step).items():
        tf.summary.scalar(name, value)
    workdir_lib.save_decomposition(workdir, recorder.arrays())

  def evaluate_and_record(steps_per_second: Optional[float]):
    nonlocal metrics
    step = experiment.step
    metrics = experiment.evaluate()
    if steps_per_second is not None:
      metrics['steps_per_second'] = steps_per_second
    for metric in (experiment.batch_loss, experiment.clipped_fraction):
      if int(metric.count.numpy()):
        metrics[metric.name] = float(metric.result())
      metric.reset_state()
    with writer.as_default(step=step):
      for name, value in metrics.items():
        tf.summary.scalar(name, value)
    writer.flush()
    workdir_lib.save_examples(workdir, experiment.examples_record())
    if step in checkpoint_steps:
      manager.save(checkpoint_number=step)
    eta = ('' if not steps_per_second else
           f', ETA {(config.steps - step) / steps_per_second / 60:.1f} min')
    log.info('step %d/%d: train %.4f (pristine %s, corrupt %s), test %.4f, loss %.4f%s%s',
             step, config.steps, metrics['train/accuracy'],
             _fmt(metrics.get('train_pristine/accuracy')),
             _fmt(metrics.get('train_corrupt/accuracy')), metrics['test/accuracy'],
             metrics['train/loss'],
             '' if steps_per_second is None else f', {steps_per_second:.0f} steps/s', eta)

  if experiment.step == 0:
    from tensorboard.plugins.hparams import api as hparams_api  # pylint: disable=g-import-not-at-top
    with writer.as_default():
      hparams_api.hparams(_hparams(config))
    if 0 in decomp_steps:
      decompose()
    evaluate_and_record(None)
  for target in sorted(eval_steps | decomp_steps):
    step = experiment.step
    if target <= step:
      continue
    start = time.perf_counter()
    experiment.train_steps(tf.constant(target - step, tf.int64))
    experiment.optimizer.iterations.numpy()  # waits for the device before timing
    steps_per_second = (target - step) / (time.perf_counter() - start)
    # The decomposition comes before the checkpoint that evaluation may write,
    # so a run resumed from that checkpoint already has it.
    if target in decomp_steps:
      decompose()
    if target in eval_steps:
      evaluate_and_record(steps_per_second)
  if not metrics:
    log.info('run in %s already complete at step %d', workdir, experiment.step)
    metrics = experiment.evaluate()
  writer.close()
  return metrics


def _fmt(value: Optional[float]) -> str:
  return '-' if value is None else f'{value:.4f}'
