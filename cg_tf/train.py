"""The label-noise experiment's training loop: SGD, winsorized SGD or another
aggregator (aggregators.py), evaluation, TensorBoard summaries, per-example
learning times and forgetting events, the §2.4 and coherence measurements, and
checkpoints.

Structure (tensorflow/privacy, uncertainty-baselines): a pure step function
`train_step(images, labels)` that `strategy.run` calls on every replica; a
compiled loop `train_steps(n)` running n steps with `tf.range`, drawing
minibatches in-graph from a stateless per-epoch shuffle, so nothing on the
Python side changes inside the loop; evaluation, summaries and checkpoints in
eager code between calls. The step count is `optimizer.iterations`.

One loop for every strategy (distribute.py): the loop draws the global
minibatch, every replica computes it, and the replicas split the
winsorization by output columns, so the numbers do not depend on the
replica count.

Seed scheme: `config.seed` sets Keras' global seed, the kernel initialisers
(model.build_mlp) and the shuffle, which for epoch k is
argsort(stateless_uniform([n], seed=[config.seed, k])): a function of the
epoch, so a resumed run draws the same minibatches without saving iterator
state. The data and the label noise depend on `config.noise_seed` (data.py).
"""

import dataclasses
import logging
import os
import re
import signal
import threading
import time
from typing import Callable, Dict, FrozenSet, Optional

import keras
import numpy as np
import tensorflow as tf

from cg_tf import aggregators
from cg_tf import coherence
from cg_tf import data as data_lib
from cg_tf import decomposition
from cg_tf import distribute
from cg_tf import gradients
from cg_tf import learning
from cg_tf import model as model_lib
from cg_tf import schedule
from cg_tf import workdir as workdir_lib
from cg_tf.config import Config
from cg_tf.errors import RunInterrupted
from cg_tf.errors import TrainingDiverged
from cg_tf.errors import UserInputError
from cg_tf.errors import WriteFailed

log = logging.getLogger('cg_tf')

# Steps per call of the compiled loop. A stop request (SIGTERM from a
# preempted VM, Ctrl-C) is honoured between calls: within 7 s at the slowest
# setting measured (c = 8 on 3x256, 65 ms a step on 2 CPU cores), inside the
# 30 s notice of a spot VM. Chunking does not change the numbers.
STEPS_PER_CALL = 100


class StopRequests:
  """Records SIGTERM and SIGINT while installed, so the loop can stop at a clean point.

  Installed only in the main thread (Python delivers signals there); elsewhere
  it records nothing.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._record)
    return self

  def _record(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


class Experiment:
  """Model, aggregator, optimizer, data on the device, and the compiled functions.

  `train_steps` and `evaluate` are the only entry points the loop needs.
  """

  def __init__(self, config: Config, noisy: data_lib.NoisyDataset,
               strategy: Optional[tf.distribute.Strategy] = None, *,
               model: Optional[keras.Model] = None,
               aggregator: Optional[aggregators.Aggregator] = None,
               optimizer: Optional[keras.optimizers.Optimizer] = None):
    """Builds what `config` names, or takes the model, aggregator and optimizer given.

    Args:
      config: the experiment.
      noisy: its training and test data.
      strategy: a tf.distribute strategy; the default strategy if None.
      model: maps [batch, 784] images to [batch, classes] logits; by default
        model.build of config.model. A given model must have been made under
        `strategy.scope()`.
      aggregator: by default aggregators.from_config(config).
      optimizer: by default SGD at config.learning_rate (the paper's); made
        under `strategy.scope()` if given.
    """
    self.config = config
    self.noisy = noisy
    self.strategy = strategy or tf.distribute.get_strategy()
    num_train = noisy.num_train
    self.batch_size = config.batch_size or num_train
    if self.batch_size > num_train:
      raise UserInputError(f'--batch_size={config.batch_size} exceeds the {num_train} '
                           'training examples')
    self.steps_per_epoch = num_train // self.batch_size
    self.aggregator = aggregator or aggregators.from_config(config)
    with self.strategy.scope():
      self.model = model or model_lib.build(
          config.model, noisy.data.train_images.shape[1], config.hidden, data_lib.NUM_CLASSES,
          config.init, config.seed)
      gradients.check_model(self.model)
      self.optimizer = optimizer or keras.optimizers.SGD(learning_rate=config.learning_rate)
      self.optimizer.build(self.model.trainable_variables)
      self.aggregator.build(self.model.trainable_variables,
                            distribute.runs_on_cpus(self.strategy))
      # Per-example learning times live in variables so checkpoints carry them.
      self.first_learned_step = tf.Variable(tf.fill([num_train], tf.constant(-1, tf.int64)),
                                            trainable=False, name='first_learned_step')
      self.learned_since_step = tf.Variable(tf.fill([num_train], tf.constant(-1, tf.int64)),
                                            trainable=False, name='learned_since_step')
      self.batch_loss = keras.metrics.Mean('train_batch/loss')
    # The minibatch is drawn outside strategy.run, so the data need no copy per replica.
    self.train_images = tf.Variable(noisy.data.train_images, trainable=False)
    self.train_labels = tf.Variable(noisy.train_labels, trainable=False)
    self.permutation = tf.Variable(tf.range(num_train, dtype=tf.int32), trainable=False)
    self.permutation_epoch = tf.Variable(tf.constant(-1, tf.int64), trainable=False)
    self.num_parameters = sum(int(np.prod(v.shape)) for v in self.model.trainable_variables)
    # Forgetting events (Toneva et al.): updated from the global minibatch's
    # predictions outside strategy.run, like the data, so one copy suffices.
    self.forgetting = None
    if config.forgetting:
      self.forgetting = {
          'last_correct': tf.Variable(tf.fill([num_train], tf.constant(-1, tf.int8)),
                                      trainable=False, name='last_correct'),
          'forgetting_events': tf.Variable(tf.zeros([num_train], tf.int32), trainable=False,
                                           name='forgetting_events'),
          'correct_presentations': tf.Variable(tf.zeros([num_train], tf.int32),
                                               trainable=False, name='correct_presentations')}

  @property
  def step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  @property
  def batch_metrics(self) -> list:
    """The running means over the steps since the last evaluation: loss, and the aggregator's."""
    return [self.batch_loss, *self.aggregator.metrics]

  def checkpoint(self) -> tf.train.Checkpoint:
    # The running batch metrics are saved too: a run stopped between two
    # evaluations resumes with the same averages.
    return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                               first_learned_step=self.first_learned_step,
                               learned_since_step=self.learned_since_step,
                               batch_metrics=[v for m in self.batch_metrics for v in m.variables],
                               **self.aggregator.checkpointed(), **(self.forgetting or {}))

  def train_step(self, images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """One step of the aggregated update on the global minibatch, on every replica (strategy.run).

    Every replica computes the whole minibatch's forward and backward pass
    (distribute.py); the aggregator splits its work over the replicas so that
    the optimizer's cross-replica sum is the one-device update.

    Args:
      images: [B, 784], the global minibatch.
      labels: [B].

    Returns:
      bool [B]: which examples the model classified correctly before the step.
    """
    batch, aggregator = self.batch_size, self.aggregator
    variables = self.model.trainable_variables
    if aggregator.needs_per_example:
      # Each example's errors carry 1 / batch for rules of the minibatch-mean
      # loss, and 1 for rules of each example's own loss.
      scale = 1.0 / batch if aggregator.per_example_scale == 'mean' else 1.0
      with tf.GradientTape() as tape:
        with gradients.recording(self.model) as record:
          logits = self.model(images)
        losses = gradients.per_example_loss(labels, logits)
        total = tf.reduce_sum(losses) * scale
      loss = tf.reduce_mean(losses)
      per_example = lambda: record.gradients(tape, total)
      mean_gradient = None
    else:
      with tf.GradientTape() as tape:
        logits = self.model(images)
        loss = tf.reduce_sum(gradients.per_example_loss(labels, logits)) / batch
      mean_gradient = lambda: tape.gradient(loss, variables)
      per_example = None
    update = aggregator.aggregate(aggregators.Minibatch(
        variables=variables, batch_size=batch, step=self.optimizer.iterations,
        mean_gradient=mean_gradient, per_example=per_example,
        vectorized_map=lambda: gradients.per_example_gradients(
            self.model, gradients.per_example_loss, images, labels)))
    self.optimizer.apply_gradients(zip(update, variables))
    self.batch_loss.update_state(loss)
    return tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels)

  def _count_forgetting(self, indices: tf.Tensor, correct: tf.Tensor) -> None:
    """Updates the forgetting record of the examples `indices` [B] from `correct` [B]."""
    record = self.forgetting
    last_correct, forgotten = coherence.count_forgetting(
        tf.gather(record['last_correct'], indices), correct)
    indices = indices[:, tf.newaxis]
    record['last_correct'].scatter_nd_update(indices, last_correct)
    record['forgetting_events'].scatter_nd_add(indices, forgotten)
    record['correct_presentations'].scatter_nd_add(indices, tf.cast(correct, tf.int32))

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
      correct = self.strategy.run(self.train_step, args=(tf.gather(self.train_images, indices),
                                                         tf.gather(self.train_labels, indices)))
      if self.forgetting is not None:
        # Every replica classified the whole minibatch alike: take the first's.
        self._count_forgetting(indices, self.strategy.experimental_local_results(correct)[0])

  @property
  def hidden_layers(self) -> list:
    """The layers whose units can die: those with weights, all but the last (the logits)."""
    return [layer for layer in self.model.layers if layer.trainable_weights][:-1]

  @tf.function
  def _predict(self, images: tf.Tensor, labels: tf.Tensor):
    """Per-example loss [n], predicted class [n], and which units of each hidden layer are active.

    The model is applied layer by layer, as keras.Sequential applies it, so
    that each hidden layer's activations can be seen: the third output holds,
    per hidden layer, a bool [units] (a Dense layer's units, a convolution's
    channels) that is True where some image of the batch, at some position,
    gives the unit a positive activation.
    """
    hidden, active, watched = images, [], set(map(id, self.hidden_layers))
    for layer in self.model.layers:
      hidden = layer(hidden)
      if id(layer) in watched:
        active.append(tf.reduce_any(hidden > 0, axis=list(range(hidden.shape.rank - 1))))
    return (gradients.per_example_loss(labels, hidden),
            tf.argmax(hidden, axis=-1, output_type=tf.int32), active)

  def predict(self, images: np.ndarray, labels: np.ndarray):
    """In eval batches, as NumPy: per-example loss [n], predicted class [n],
    and per hidden layer a bool [width], True where some image activates the unit."""
    losses, predictions, active = [], [], None
    for start in range(0, len(labels), self.config.eval_batch_size):
      stop = start + self.config.eval_batch_size
      loss, prediction, batch_active = self._predict(images[start:stop], labels[start:stop])
      losses.append(loss.numpy())
      predictions.append(prediction.numpy())
      batch_active = [a.numpy() for a in batch_active]
      active = batch_active if active is None else [a | b for a, b in zip(active, batch_active)]
    return np.concatenate(losses), np.concatenate(predictions), active

  def evaluate(self) -> Dict[str, float]:
    """Metrics of the current model; updates the per-example learning times.

    Returns:
      'split/name' -> value, for the noisy training set, its pristine and
      corrupt parts (against their training labels), the training set against
      its clean labels, the test set, the §3.3 overfit, and for each hidden
      layer the fraction of its units that no training image activates
      ('dead_units/hidden_i'): a ReLU unit that is dead on every example gets
      no gradient from any of them, and a dead layer stops all learning below it.
    """
    step, noisy, clean = self.step, self.noisy, self.noisy.data
    train_loss, train_prediction, train_active = self.predict(clean.train_images,
                                                              noisy.train_labels)
    test_loss, test_prediction, _ = self.predict(clean.test_images, clean.test_labels)
    metrics, fitted = label_noise_metrics(noisy, self.config.noise, train_loss,
                                          train_prediction, test_loss, test_prediction)
    for layer, active in zip(self.hidden_layers, train_active):
      metrics[f'dead_units/{layer.name}'] = 1.0 - active.mean()
    metrics.update(self.aggregator.evaluation_metrics(self.noisy.num_train, self.batch_size, step))
    first, since = learning.learning_times(self.first_learned_step.numpy(),
                                           self.learned_since_step.numpy(), fitted, step)
    self.first_learned_step.assign(first)
    self.learned_since_step.assign(since)
    return {k: float(v) for k, v in metrics.items()}

  def examples_record(self) -> Dict[str, np.ndarray]:
    """What examples.npz holds: one entry per training example."""
    return {'label': self.noisy.data.train_labels, 'train_label': self.noisy.train_labels,
            'corrupt': self.noisy.corrupt, 'subset_index': self.noisy.subset,
            'first_learned_step': self.first_learned_step.numpy(),
            'learned_since_step': self.learned_since_step.numpy(),
            **{name: v.numpy() for name, v in (self.forgetting or {}).items()}}


def label_noise_metrics(noisy: data_lib.NoisyDataset, noise: float, train_loss: np.ndarray,
                        train_prediction: np.ndarray, test_loss: np.ndarray,
                        test_prediction: np.ndarray):
  """The label-noise experiment's metrics of a model from its per-example losses and predictions.

  Args:
    noisy: the training set (its training and clean labels, corrupt mask) and test set.
    noise: the share of labels permuted (the setting, which the overfit's proper accuracy uses).
    train_loss, train_prediction: [n_train] against the training labels.
    test_loss, test_prediction: [n_test].

  Returns:
    ({'split/name': value} for the noisy training set, its pristine and corrupt
    parts (against their training labels), the training set against its clean
    labels, the test set, the §3.3 overfit, and the share of training examples
    given the most common predicted class ('train/most_common_prediction');
    bool [n_train] which training examples the model fits).
  """
  clean = noisy.data
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
  metrics['overfit'] = metrics['train/accuracy'] - (
      noise * 0.1 + (1 - noise) * metrics['test/accuracy'])
  # About 0.1 on a balanced 10-class set while the network learns; 1.0 once it
  # has collapsed to one class, which committed runs (no checkpoints) show only here.
  metrics['train/most_common_prediction'] = (np.bincount(train_prediction).max()
                                             / train_prediction.size)
  return metrics, fitted


def _hparams(config: Config) -> Dict[str, object]:
  return {k: (','.join(map(str, v)) if isinstance(v, tuple) else ('' if v is None else v))
          for k, v in dataclasses.asdict(config).items()}


# The HParams tab's metrics: a run's last value of each of these tags.
HPARAMS_METRICS = (('test/accuracy', 'final test accuracy'), ('overfit', 'final overfit (§3.3)'),
                   ('train_corrupt/accuracy', 'corrupt labels fitted'),
                   ('train/accuracy', 'final train accuracy'))


def scalars_layout(config: Config):
  """TensorBoard's Custom Scalars layout of a run: one chart per panel of the paper.

  Figure 1's training, pristine, corrupt and test accuracy together (and the
  losses); Figure 4's ta, va and overfit; §2.4's f^p and f^c when measured,
  with their null worlds; m-coherence when measured; the hidden layers' dead
  units and the share of images given the most common class, which show a
  collapse to one class.
  """
  from tensorboard.plugins.custom_scalar import layout_pb2  # pylint: disable=g-import-not-at-top

  def chart(title, *tags):
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=tags))

  categories = [
      layout_pb2.Category(title='Figure 1: label noise (§2.3)', chart=[
          chart('accuracy: train, pristine, corrupt (training labels), test',
                r'^train/accuracy$', r'^train_pristine/accuracy$', r'^train_corrupt/accuracy$',
                r'^test/accuracy$'),
          chart('loss: train, pristine, corrupt, test', r'^train/loss$',
                r'^train_pristine/loss$', r'^train_corrupt/loss$', r'^test/loss$')]),
      layout_pb2.Category(title='Figure 4: ta, va and overfit (§3.3)', chart=[
          chart('ta (train accuracy), va (test accuracy), overfit', r'^train/accuracy$',
                r'^test/accuracy$', r'^overfit$')])]
  if config.decomp_every:
    categories.append(layout_pb2.Category(title='Figures 2-3: f^p and f^c (§2.4)', chart=[
        chart('f^p and f^c, exact', r'^decomposition/f_(pristine|corrupt)$'),
        chart('f^p and f^c in the null worlds', r'^decomposition_null\d+/f_(pristine|corrupt)$'),
        chart('i^p and i^c (first steps)', r'^decomposition/i_(pristine|corrupt)$')]))
  if config.coherence_every:
    categories.append(layout_pb2.Category(title='Coherence', chart=[
        chart('m-coherence: whole, pristine, corrupt', r'^coherence/m_coherence(_\w+)?$')]))
  categories.append(layout_pb2.Category(title='Collapse: dead units, one class', chart=[
      chart('share of units no training image activates', r'^dead_units/'),
      chart('share of training images given the most common class',
            r'^train/most_common_prediction$')]))
  return layout_pb2.Layout(category=categories)


def write_dashboards(config: Config) -> None:
  """Writes, into the default summary writer, the run's hparams (with HPARAMS_METRICS as the
  HParams tab's metrics) and its Custom Scalars layout (scalars_layout)."""
  from tensorboard.plugins.custom_scalar import summary as custom_scalars  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import api as hparams_api  # pylint: disable=g-import-not-at-top
  hparams = _hparams(config)
  hparams_api.hparams_config(hparams=[hparams_api.HParam(name) for name in hparams],
                             metrics=[hparams_api.Metric(tag, display_name=name)
                                      for tag, name in HPARAMS_METRICS])
  hparams_api.hparams(hparams)
  tf.summary.experimental.write_raw_pb(custom_scalars.pb(scalars_layout(config)).SerializeToString(),
                                       step=0)


def train_and_evaluate(config: Config, workdir: str,
                       dataset: Optional[data_lib.Dataset] = None,
                       strategy: Optional[tf.distribute.Strategy] = None) -> Dict[str, float]:
  """Runs (or resumes) the label-noise experiment in `workdir`.

  Writes into `workdir`: config.json, TensorBoard event files, examples.npz,
  decomposition.npz and coherence.npz when measured, final_metrics.json and
  checkpoints under checkpoints/. Rerunning after a kill resumes from the last
  checkpoint and ends with the same numbers as an uninterrupted run.

  Under MultiWorkerMirroredStrategy every worker runs this with the same
  arguments; only the chief writes the run directory.

  Args:
    config: the experiment.
    workdir: run directory.
    dataset: clean dataset to use instead of loading config.dataset (tests).
    strategy: a tf.distribute strategy; the default strategy if None. The
      numbers do not depend on it (bit for bit on identical devices), and a
      run checkpointed under one strategy resumes under another.

  Returns:
    The metrics of the last evaluation.

  Raises:
    UserInputError: bad data directory, unwritable or mismatched workdir.
    TrainingDiverged: the training loss became NaN or infinite; the last
      good checkpoint and the summaries so far are kept.
    RunInterrupted: SIGTERM or SIGINT arrived; a checkpoint of the current
      step was saved, and rerunning resumes from it.
    WriteFailed: a file could not be written; temporary files are removed
      and the last good checkpoint is kept.
  """
  # SIGTERM and SIGINT are recorded from here on and honoured between calls
  # of the compiled loop, where a checkpoint of the current step is consistent.
  with StopRequests() as stop:
    return _train_and_evaluate(config, workdir, dataset, strategy, stop)


@dataclasses.dataclass
class Action:
  """Something the loop does between compiled calls, at the steps it names.

  Attributes:
    name: what it is, for the log.
    steps: the steps at which it runs (after the step's update).
    run: run(step) does it.
  """
  name: str
  steps: FrozenSet[int]
  run: Callable[[int], None]


def _checkpoint_number(path: str) -> int:
  match = re.search(r'ckpt-(\d+)', os.path.basename(path))
  return int(match.group(1)) if match else -1


def restore_newest_readable(checkpoint: tf.train.Checkpoint, directory: str) -> Optional[str]:
  """Restores the newest checkpoint in `directory` that reads back whole; returns its path.

  A checkpoint whose files are truncated, overwritten or missing (a power
  cut, a full disk, a partial copy) is skipped with one log line naming it,
  and the one before is tried: the run then redoes the steps since, with the
  same numbers, as after a kill.

  Returns:
    The path restored, or None if `directory` holds no checkpoint.

  Raises:
    UserInputError: there are checkpoints, and none can be read.
  """
  stems = {re.sub(r'\.(index|data-\d+-of-\d+)$', '', p)
           for p in tf.io.gfile.glob(os.path.join(directory, 'ckpt-*'))}
  paths = sorted((p for p in stems if re.fullmatch(r'ckpt-\d+', os.path.basename(p))),
                 key=_checkpoint_number, reverse=True)
  for path in paths:
    try:
      checkpoint.restore(path).assert_existing_objects_matched()
      return path
    except (tf.errors.OpError, ValueError, IndexError, AssertionError) as e:
      log.warning('checkpoint %s cannot be read (%s); trying the one before', path,
                  failure_reason(e))
  if paths:
    raise UserInputError(
        f'no checkpoint in {directory} can be read ({", ".join(map(os.path.basename, paths))}); '
        f'restore them from a copy, or move {directory} aside to start the run over')
  return None


def failure_reason(error: Exception) -> str:
  """What an OSError or TensorFlow error says went wrong, in a few words, without TensorFlow's
  internals (function names, devices, op names); the whole message goes to the debug log."""
  log.debug('full error: %s', error)
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  message = getattr(error, 'message', None) or str(error) or type(error).__name__
  message = re.sub(r'\{\{[^}]*\}\}', '', message)
  message = re.sub(r'\s*\[Op:[^\]]*\]', '', message).strip()
  return message.split('; ')[-1].splitlines()[0].strip() or type(error).__name__


class RunFiles:
  """The run directory as the loop writes it: checkpoints, summaries, records.

  A write that fails stops the run with one line naming the file, the step,
  the reason and the last good checkpoint (WriteFailed); only the chief of
  several workers writes summaries and records.
  """

  def __init__(self, workdir: str, experiment: Experiment, strategy: tf.distribute.Strategy):
    self.workdir, self.experiment = workdir, experiment
    self.chief = distribute.is_chief(strategy)
    # Every worker takes part in each save; a non-chief worker's copy goes to
    # scratch space and is deleted.
    self.manager = tf.train.CheckpointManager(
        experiment.checkpoint(), distribute.checkpoint_dir(workdir, strategy), max_to_keep=3)
    self.writer = (tf.summary.create_file_writer(workdir) if self.chief else
                   tf.summary.create_noop_writer())
    if self.chief:
      self.remove_partial_writes()

  def remove_partial_writes(self) -> None:
    """Deletes what an interrupted write left: TensorFlow writes `checkpoint`,
    records and checkpoint shards to temporary names first and renames them
    when complete, so these names never hold anything finished."""
    checkpoints = os.path.join(self.workdir, 'checkpoints')
    for leftover in (tf.io.gfile.glob(os.path.join(self.workdir, '*.tmp*')) +
                     tf.io.gfile.glob(os.path.join(checkpoints, '*.tmp*')) +
                     tf.io.gfile.glob(os.path.join(checkpoints, '*_temp*'))):
      (tf.io.gfile.rmtree if tf.io.gfile.isdir(leftover) else tf.io.gfile.remove)(leftover)

  def last_checkpoint(self) -> Optional[str]:
    return tf.train.latest_checkpoint(os.path.join(self.workdir, 'checkpoints'))

  def write(self, path: str, action: Callable[[], object]) -> None:
    """Runs `action`, which writes `path`; a failure stops the run with one clear line."""
    try:
      action()
    except (OSError, tf.errors.OpError) as e:
      reason = failure_reason(e)
      if self.chief:
        self.remove_partial_writes()
      raise WriteFailed(
          f'could not write {path} at step {self.experiment.step} ({reason}). '
          f'The last good checkpoint is {self.last_checkpoint() or "none"}; free space or '
          'restore access, then rerun the same command to resume from it') from None

  def save_checkpoint(self, step: int) -> None:
    self.write(self.manager.directory, lambda: self.manager.save(checkpoint_number=step))
    if not self.chief:
      tf.io.gfile.rmtree(self.manager.directory)

  def flush(self) -> None:
    self.write(os.path.join(self.workdir, 'events.out.tfevents.*'), self.writer.flush)

  def scalars(self, step: int, values: Dict[str, float]) -> None:
    with self.writer.as_default(step=step):
      for name, value in values.items():
        tf.summary.scalar(name, value)

  def record(self, filename: str, save: Callable[[], None]) -> None:
    """Writes a record file of the chief (examples.npz, decomposition.npz, ...) by `save`."""
    if self.chief:
      self.write(os.path.join(self.workdir, filename), save)


def measurement_action(name: str, steps, recorder, filename: str, files: RunFiles) -> Action:
  """At `steps`: measures with `recorder` (decomposition.Recorder, coherence.Recorder), writes
  its scalars and images as summaries, and its records to `filename`."""

  def run(step):
    start = time.perf_counter()
    recorder.measure(step)
    log.info('step %d: %s measured in %.2f s', step, name, time.perf_counter() - start)
    files.scalars(step, recorder.scalars())
    with files.writer.as_default(step=step):
      for tag, image in recorder.image_summaries().items():
        tf.summary.image(tag, image)
    files.record(filename, lambda: workdir_lib.save_measurements(files.workdir, filename,
                                                                 recorder.arrays()))

  return Action(name, frozenset(steps), run)


class Evaluation:
  """The evaluation action: metrics, summaries, the divergence check, examples.npz, the log line.

  Attributes:
    metrics: the last evaluation's metrics ({} before the first).
    steps_per_second: set by the loop before each evaluation (None at step 0).
  """

  def __init__(self, experiment: Experiment, files: RunFiles, config: Config):
    self.experiment, self.files, self.config = experiment, files, config
    self.metrics: Dict[str, float] = {}
    self.steps_per_second: Optional[float] = None

  def __call__(self, step: int) -> None:
    experiment, config = self.experiment, self.config
    metrics = experiment.evaluate()
    if self.steps_per_second is not None:
      metrics['steps_per_second'] = self.steps_per_second
    for metric in experiment.batch_metrics:
      if int(metric.count.numpy()):
        metrics[metric.name] = float(metric.result())
      metric.reset_state()
    self.metrics = metrics
    self.files.scalars(step, metrics)
    self.files.flush()
    if not np.isfinite(metrics['train/loss']):
      raise TrainingDiverged(
          f'training diverged at step {step}: the training loss is {metrics["train/loss"]}. '
          f'Kept: the summaries to step {step} and the last good checkpoint '
          f'({self.files.manager.latest_checkpoint or "none"}). Try a --learning_rate smaller '
          f'than {config.learning_rate:g} in a new --logdir')
    self.files.record(workdir_lib.EXAMPLES_FILE, lambda: workdir_lib.save_examples(
        self.files.workdir, experiment.examples_record()))
    speed = self.steps_per_second
    # The first steps' speed includes compiling the loop: no ETA from them.
    eta = ('' if not speed or step < 100 else
           f', ETA {(config.steps - step) / speed / 60:.1f} min')
    log.info('step %d/%d: train %.4f (pristine %s, corrupt %s), test %.4f, loss %.4f%s%s',
             step, config.steps, metrics['train/accuracy'],
             _fmt(metrics.get('train_pristine/accuracy')),
             _fmt(metrics.get('train_corrupt/accuracy')), metrics['test/accuracy'],
             metrics['train/loss'], '' if speed is None else f', {speed:.0f} steps/s', eta)


def _train_and_evaluate(config, workdir, dataset, strategy, stop):
  strategy = strategy or tf.distribute.get_strategy()
  chief = distribute.is_chief(strategy)
  if chief:
    workdir_lib.prepare(workdir, config)
  if workdir_lib.finished_run(workdir, config):
    log.info('run in %s already complete: nothing to do', workdir)
    return workdir_lib.read_final_metrics(workdir)
  if dataset is None:
    dataset = data_lib.load(config.dataset, config.data_dir)
  noisy = data_lib.make_noisy(dataset, config.train_size, config.noise, config.noise_seed)
  keras.utils.set_random_seed(config.seed)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  experiment = Experiment(config, noisy, strategy)
  # Every worker resumes from the chief's checkpoints.
  restored = restore_newest_readable(experiment.checkpoint(), os.path.join(workdir, 'checkpoints'))
  if restored:
    log.info('resuming at step %d from %s', experiment.step, restored)
  files = RunFiles(workdir, experiment, strategy)
  evaluation = Evaluation(experiment, files, config)
  # Every worker stops at the same steps, so their compiled calls line up;
  # only the chief measures, which only writes. Measurements come before the
  # checkpoint of the same step, so a run resumed from it already has them.
  actions = []
  if chief:
    for every, name, filename, make in (
        (config.decomp_every, 'decomposition', workdir_lib.DECOMPOSITION_FILE,
         lambda: decomposition.Recorder(
             experiment.model, noisy.data.train_images, noisy.train_labels, noisy.corrupt,
             config.null_worlds, config.noise_seed, config.eval_batch_size,
             config.decomp_sample_examples, config.decomp_sample_weights)),
        (config.coherence_every, 'coherence', workdir_lib.COHERENCE_FILE,
         lambda: coherence.Recorder(
             experiment.model, noisy.data.train_images, noisy.train_labels, noisy.corrupt,
             config.eval_batch_size, config.stiffness_examples, config.noise_seed,
             data_lib.NUM_CLASSES))):
      steps = schedule.decomposition_steps(config.steps, every, config.decomp_dense_steps)
      if steps:
        recorder = make()
        saved = workdir_lib.read_measurements(workdir, filename)
        if saved is not None:
          recorder.restore(saved, experiment.step)
        actions.append(measurement_action(name, steps, recorder, filename, files))
  actions.append(Action('evaluation', frozenset(schedule.evaluation_steps(
      config.steps, config.eval_every, config.checkpoint_every)), evaluation))
  actions.append(Action('checkpoint', frozenset(schedule.checkpoint_steps(
      config.steps, config.checkpoint_every)), files.save_checkpoint))
  log.info('%d training examples (%d corrupt), %d parameters, %d steps of batch %d, %s%s',
           noisy.num_train, noisy.corrupt.sum(), experiment.num_parameters, config.steps,
           experiment.batch_size, distribute.describe(strategy),
           {None: '', 'xla': ', order statistics by XLA',
            'cpu_kernel': ', order statistics by the compiled CPU kernel'}[
                experiment.aggregator.backend])

  if experiment.step == 0:
    with files.writer.as_default():
      write_dashboards(config)
    for action in actions:
      if 0 in action.steps:
        action.run(0)
  _walk(experiment, actions, evaluation, files, stop)
  metrics = evaluation.metrics
  if not metrics:  # killed after the last checkpoint, before final_metrics.json
    metrics = experiment.evaluate()
  files.writer.close()
  if chief:
    files.write(os.path.join(workdir, workdir_lib.FINAL_METRICS_FILE),
                lambda: workdir_lib.save_final_metrics(workdir, experiment.step, metrics))
  return metrics


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@tf.function
def _count_over_workers(strategy: tf.distribute.Strategy, counts: tf.Tensor) -> tf.Tensor:
  return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: counts), axis=None)


def agreed_stop(signum: Optional[int], strategy: tf.distribute.Strategy) -> Optional[int]:
  """The stop signal some worker has received, the same on every worker, or None.

  Cloud preemption often stops one machine of several: under
  MultiWorkerMirroredStrategy the workers agree at each call of the
  compiled loop (a sum over workers of which signals each has seen), so that
  all of them save and stop together, SIGTERM before SIGINT. One process
  needs no agreement.
  """
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return signum
  counts = tf.constant([int(signum == s) for s in _STOP_SIGNALS], tf.int32)
  seen = _count_over_workers(strategy, counts).numpy()
  return next((s for s, n in zip(_STOP_SIGNALS, seen) if n > 0), None)


def _walk(experiment: Experiment, actions, evaluation: Evaluation, files: RunFiles,
          stop: StopRequests) -> None:
  """Trains to each step some action names, in calls of STEPS_PER_CALL steps, then runs the
  actions of that step in their order; a stop request is honoured before a call."""
  for target in sorted(frozenset().union(*(action.steps for action in actions))):
    step = experiment.step
    if target <= step:
      continue
    start = time.perf_counter()
    while experiment.step < target:  # .step waits for the device
      # Stop only before a call: a target reached has its actions run first, so
      # the checkpoint never skips an evaluation the resumed run would not redo.
      signum = agreed_stop(stop.signum, experiment.strategy)
      if signum is not None:
        stopped_at = experiment.step
        files.save_checkpoint(stopped_at)
        files.flush()
        saved = os.path.join(files.workdir, 'checkpoints', f'ckpt-{stopped_at}')
        raise RunInterrupted(
            f'stopped by {signal.Signals(signum).name} at step {stopped_at}; saved {saved}. '
            'Rerun the same command to resume', signum)
      experiment.train_steps(tf.constant(min(STEPS_PER_CALL, target - experiment.step),
                                         tf.int64))
    evaluation.steps_per_second = (target - step) / (time.perf_counter() - start)
    for action in actions:
      if target in action.steps:
        action.run(target)


def _fmt(value: Optional[float]) -> str:
  return '-' if value is None else f'{value:.4f}'
