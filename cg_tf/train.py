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
import signal
import threading
import time
from typing import Dict, Optional

import keras
import numpy as np
import tensorflow as tf

from cg_tf import aggregators
from cg_tf import coherence
from cg_tf import data as data_lib
from cg_tf import decomposition
from cg_tf import distribute
from cg_tf import gradients
from cg_tf import model as model_lib
from cg_tf import schedule
from cg_tf import winsorize
from cg_tf import workdir as workdir_lib
from cg_tf.config import Config
from cg_tf.config import OVER_MINIBATCHES
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
      # m3, rm3, ra3: the last three minibatch gradients of each variable. Every
      # replica computes the same ones, so the first replica's copy is kept.
      self.gradient_history = [
          tf.Variable(tf.zeros([3, *v.shape]), trainable=False, name=f'history_{i}',
                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
          for i, v in enumerate(self.model.trainable_variables)
      ] if config.aggregator in OVER_MINIBATCHES else []
      self.batch_loss = keras.metrics.Mean('train_batch/loss')
      self.clipped_fraction = keras.metrics.Mean('train_batch/winsor_clipped_fraction')
    # The minibatch is drawn outside strategy.run, so the data need no copy per replica.
    self.train_images = tf.Variable(noisy.data.train_images, trainable=False)
    self.train_labels = tf.Variable(noisy.train_labels, trainable=False)
    self.permutation = tf.Variable(tf.range(num_train, dtype=tf.int32), trainable=False)
    self.permutation_epoch = tf.Variable(tf.constant(-1, tf.int64), trainable=False)
    self.num_parameters = sum(int(np.prod(v.shape)) for v in self.model.trainable_variables)
    # How the fast winsorized and trimmed sums find their extremes, and the
    # median its middle values (winsorize.py, aggregators.py).
    self.extremes_backend = None
    if config.aggregator in ('trimmed_mean', 'median') or (
        config.aggregator == 'winsorize' and config.winsor_c > 0 and
        config.winsor_impl != 'reference'):
      self.extremes_backend = winsorize.backend_for(config.winsor_impl,
                                                    distribute.runs_on_cpus(self.strategy))
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

  def checkpoint(self) -> tf.train.Checkpoint:
    # The running batch metrics are saved too: a run stopped between two
    # evaluations resumes with the same averages.
    return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                               first_learned_step=self.first_learned_step,
                               learned_since_step=self.learned_since_step,
                               batch_metrics=[*self.batch_loss.variables,
                                              *self.clipped_fraction.variables],
                               gradient_history=self.gradient_history,
                               **(self.forgetting or {}))

  def _gradients(self, images: tf.Tensor, labels: tf.Tensor):
    """This replica's share of the minibatch gradient, and the mean loss.

    Every replica computes the whole minibatch (distribute.py): the update
    comes whole from replica 0 (SGD, the reference path, median, clipping,
    m3/rm3/ra3) or column block by column block from every replica (the fast
    winsorized path, trimmed_mean), zeros elsewhere, so the optimizer's
    cross-replica sum is the one-device update.

    Args:
      images: [B, 784], the global minibatch.
      labels: [B].

    Returns:
      (one tensor per trainable variable, float32 scalar, logits [B, classes]).
    """
    config, batch = self.config, self.batch_size
    rule, c = config.aggregator, float(config.winsor_c)
    variables = self.model.trainable_variables
    if rule == 'mean' or rule in OVER_MINIBATCHES or (
        rule == 'winsorize' and (c == 0 or config.winsor_impl == 'reference')):
      with tf.GradientTape() as tape:
        logits = self.model(images)
        loss = tf.reduce_sum(gradients.per_example_loss(labels, logits)) / batch
      if rule == 'winsorize' and c > 0:
        # The loss is the minibatch mean, so example e contributes g_e / batch.
        grads = [winsorize.winsorized_sum_reference(g / batch, c) for g in
                 gradients.per_example_gradients(self.model, gradients.per_example_loss,
                                                 images, labels)]
      else:
        grads = tape.gradient(loss, variables)
      if rule in OVER_MINIBATCHES:
        grads = self._over_minibatches(grads)
      return [distribute.only_first_replica(g) for g in grads], loss, logits
    if rule in ('median', 'l2clip', 'dp'):
      losses, logits, factors = gradients.dense_per_example_factors(self.model, images, labels)
      grads = self._whole_batch_aggregate([(a, delta) for _, a, delta in factors])
      return [distribute.only_first_replica(g) for g in grads], tf.reduce_mean(losses), logits
    losses, logits, factors = gradients.dense_per_example_factors(self.model, images, labels,
                                                                  loss_scale=1.0 / batch)
    if rule == 'trimmed_mean':
      k = config.trim_k
      by_variable = {}
      for layer, a, delta in factors:
        width = delta.shape[-1]
        columns = distribute.own_columns(width)
        # delta carries 1 / batch; the kept batch - 2k values are averaged.
        rescale = batch / (batch - 2 * k)
        by_variable[id(layer.kernel)] = distribute.place_columns(
            winsorize.trimmed_outer_sum(a, delta, k, columns, self.extremes_backend) * rescale,
            width)
        by_variable[id(layer.bias)] = distribute.place_columns(
            winsorize.trimmed_sum(delta, k, columns, self.extremes_backend) * rescale, width)
      return [by_variable[id(v)] for v in variables], tf.reduce_mean(losses), logits
    by_variable, num_clipped = {}, tf.constant(0, tf.int64)
    for layer, a, delta in factors:
      width = delta.shape[-1]
      columns = distribute.own_columns(width)
      kernel_sum, kernel_clipped = winsorize.winsorized_outer_sum_and_count(
          a, delta, c, columns, self.extremes_backend)
      bias_sum, bias_clipped = winsorize.winsorized_sum_and_count(delta, c, columns,
                                                                  self.extremes_backend)
      by_variable[id(layer.kernel)] = distribute.place_columns(kernel_sum, width)
      by_variable[id(layer.bias)] = distribute.place_columns(bias_sum, width)
      num_clipped += kernel_clipped + bias_clipped
    num_clipped = distribute.sum_over_replicas(num_clipped)
    self.clipped_fraction.update_state(
        tf.cast(num_clipped, tf.float32) / (self.num_parameters * self.batch_size))
    return [by_variable[id(v)] for v in variables], tf.reduce_mean(losses), logits

  def _whole_batch_aggregate(self, factors):
    """median, l2clip or dp from each Dense layer's (a [B, in], delta [B, out]), delta unscaled.

    Returns:
      One update per trainable variable, on the scale of the mean gradient.
    """
    config, batch = self.config, self.batch_size
    if config.aggregator == 'median':
      sums = []
      for a, delta in factors:
        sums += [aggregators.outer_median(a, delta, self.extremes_backend),
                 aggregators.median(delta)]
      return sums
    sums = aggregators.clipped_sums(factors, config.clip_norm)
    if config.aggregator == 'dp':
      noise = aggregators.gaussian_noise([s.shape for s in sums],
                                         config.noise_multiplier * config.clip_norm,
                                         config.seed, self.optimizer.iterations)
      sums = [s + n for s, n in zip(sums, noise)]
    return [s / batch for s in sums]

  def _over_minibatches(self, grads):
    """m3 / rm3 / ra3: records this minibatch's gradients; returns the rule's update."""
    seen = self.optimizer.iterations + 1  # minibatches seen, this one included
    updates = []
    for g, history in zip(grads, self.gradient_history):
      # The first gradient fills the buffer, as in the authors' code; each next
      # one replaces the oldest.
      recorded = tf.where(seen == 1, tf.stack([g, g, g]), tf.tensor_scatter_nd_update(
          history, [[(seen - 1) % 3]], g[tf.newaxis]))
      history.assign(recorded)
      updates.append(aggregators.over_minibatches(self.config.aggregator, recorded, seen))
    return updates

  def train_step(self, images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """One (winsorized) SGD step on the global minibatch, run on every replica by strategy.run.

    Args:
      images: [B, 784], the global minibatch.
      labels: [B].

    Returns:
      bool [B]: which examples the model classified correctly before the step.
    """
    grads, loss, logits = self._gradients(images, labels)
    self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
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

  @tf.function
  def _predict(self, images: tf.Tensor, labels: tf.Tensor):
    """Per-example loss [n], predicted class [n], and which units of each hidden layer are active.

    The model is applied layer by layer, as keras.Sequential applies it, so
    that each hidden layer's activations can be seen: the third output holds,
    per hidden layer, a bool [width] that is True where some image of the
    batch gives the unit a positive activation.
    """
    hidden, active = images, []
    for layer in self.model.layers[:-1]:
      hidden = layer(hidden)
      active.append(tf.reduce_any(hidden > 0, axis=0))
    logits = self.model.layers[-1](hidden)
    return (gradients.per_example_loss(labels, logits),
            tf.argmax(logits, axis=-1, output_type=tf.int32), active)

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
    for layer, active in zip(self.model.layers, train_active):
      metrics[f'dead_units/{layer.name}'] = 1.0 - active.mean()
    if self.config.aggregator == 'dp':
      metrics['dp/epsilon'] = aggregators.dp_epsilon(
          self.noisy.num_train, self.batch_size, step, self.config.noise_multiplier,
          self.config.dp_delta)
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
            'learned_since_step': self.learned_since_step.numpy(),
            **{name: v.numpy() for name, v in (self.forgetting or {}).items()}}


def _hparams(config: Config) -> Dict[str, object]:
  return {k: (','.join(map(str, v)) if isinstance(v, tuple) else ('' if v is None else v))
          for k, v in dataclasses.asdict(config).items()}


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


def _train_and_evaluate(config, workdir, dataset, strategy, stop):
  strategy = strategy or tf.distribute.get_strategy()
  chief = distribute.is_chief(strategy)
  if chief:
    workdir_lib.prepare(workdir, config)
  if dataset is None:
    dataset = data_lib.load(config.dataset, config.data_dir)
  noisy = data_lib.make_noisy(dataset, config.train_size, config.noise, config.noise_seed)
  keras.utils.set_random_seed(config.seed)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  experiment = Experiment(config, noisy, strategy)
  # Every worker resumes from the chief's checkpoints and takes part in each
  # save; a non-chief worker's copy goes to scratch space and is deleted.
  latest = tf.train.latest_checkpoint(os.path.join(workdir, 'checkpoints'))
  if latest:
    experiment.checkpoint().restore(latest).assert_existing_objects_matched()
    log.info('resuming at step %d from %s', experiment.step, latest)
  manager = tf.train.CheckpointManager(experiment.checkpoint(),
                                       distribute.checkpoint_dir(workdir, strategy), max_to_keep=3)

  def write(path, action):
    """Runs `action`, which writes `path`; a failure stops the run with one clear line."""
    try:
      action()
    except (OSError, tf.errors.OpError) as e:
      reason = getattr(e, 'strerror', None) or getattr(e, 'message', None) or str(e)
      for leftover in (tf.io.gfile.glob(os.path.join(workdir, '*.tmp*')) +
                       tf.io.gfile.glob(os.path.join(workdir, 'checkpoints', '*_temp*'))):
        (tf.io.gfile.rmtree if tf.io.gfile.isdir(leftover) else tf.io.gfile.remove)(leftover)
      last_good = tf.train.latest_checkpoint(os.path.join(workdir, 'checkpoints'))
      raise WriteFailed(
          f'could not write {path} at step {experiment.step} ({reason.splitlines()[0]}). '
          f'The last good checkpoint is {last_good or "none"}; free space or restore access, '
          'then rerun the same command to resume from it') from None

  def save_checkpoint(step):
    write(manager.directory, lambda: manager.save(checkpoint_number=step))
    if not chief:
      tf.io.gfile.rmtree(manager.directory)

  # Every worker stops at the same steps, so their compiled calls line up;
  # only the chief measures, which only writes.
  decomp_steps = set(schedule.decomposition_steps(config.steps, config.decomp_every,
                                                  config.decomp_dense_steps))
  coherence_steps = set(schedule.decomposition_steps(config.steps, config.coherence_every,
                                                     config.decomp_dense_steps))
  measurements = []  # (steps, recorder, file name)
  if decomp_steps and chief:
    measurements.append((decomp_steps, decomposition.Recorder(
        experiment.model, noisy.data.train_images, noisy.train_labels, noisy.corrupt,
        config.null_worlds, config.noise_seed, config.eval_batch_size,
        config.decomp_sample_examples, config.decomp_sample_weights),
                         workdir_lib.DECOMPOSITION_FILE))
  if coherence_steps and chief:
    measurements.append((coherence_steps, coherence.Recorder(
        experiment.model, noisy.data.train_images, noisy.train_labels, noisy.corrupt,
        config.eval_batch_size, config.stiffness_examples, config.noise_seed,
        data_lib.NUM_CLASSES), workdir_lib.COHERENCE_FILE))
  for _, recorder, filename in measurements:
    saved = workdir_lib.read_measurements(workdir, filename)
    if saved is not None:
      recorder.restore(saved, experiment.step)
  measure_steps = decomp_steps | coherence_steps
  writer = tf.summary.create_file_writer(workdir) if chief else tf.summary.create_noop_writer()
  eval_steps = set(schedule.evaluation_steps(config.steps, config.eval_every,
                                             config.checkpoint_every))
  checkpoint_steps = set(schedule.checkpoint_steps(config.steps, config.checkpoint_every))
  metrics: Dict[str, float] = {}
  log.info('%d training examples (%d corrupt), %d parameters, %d steps of batch %d, %s%s',
           noisy.num_train, noisy.corrupt.sum(), experiment.num_parameters, config.steps,
           experiment.batch_size, distribute.describe(strategy),
           {None: '', 'xla': ', order statistics by XLA',
            'cpu_kernel': ', order statistics by the compiled CPU kernel'}[
                experiment.extremes_backend])

  def measure():
    step = experiment.step
    for steps, recorder, filename in measurements:
      if step not in steps:
        continue
      start = time.perf_counter()
      recorder.measure(step)
      log.info('step %d: %s measured in %.2f s', step, os.path.splitext(filename)[0],
               time.perf_counter() - start)
      with writer.as_default(step=step):
        for name, value in recorder.scalars().items():
          tf.summary.scalar(name, value)
        for name, image in recorder.image_summaries().items():
          tf.summary.image(name, image)
      write(os.path.join(workdir, filename),
            lambda: workdir_lib.save_measurements(workdir, filename, recorder.arrays()))  # pylint: disable=cell-var-from-loop

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
    write(os.path.join(workdir, 'events.out.tfevents.*'), writer.flush)
    if not np.isfinite(metrics['train/loss']):
      raise TrainingDiverged(
          f'training diverged at step {step}: the training loss is {metrics["train/loss"]}. '
          f'Kept: the summaries to step {step} and the last good checkpoint '
          f'({manager.latest_checkpoint or "none"}). Try a --learning_rate smaller than '
          f'{config.learning_rate:g} in a new --logdir')
    if chief:
      write(os.path.join(workdir, workdir_lib.EXAMPLES_FILE),
            lambda: workdir_lib.save_examples(workdir, experiment.examples_record()))
    if step in checkpoint_steps:
      save_checkpoint(step)
    # The first steps' speed includes compiling the loop: no ETA from them.
    eta = ('' if not steps_per_second or step < 100 else
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
    measure()
    evaluate_and_record(None)
  for target in sorted(eval_steps | measure_steps):
    step = experiment.step
    if target <= step:
      continue
    start = time.perf_counter()
    while experiment.step < target:  # .step waits for the device
      # Stop only before a call: a target reached is evaluated first, so the
      # checkpoint never skips an evaluation the resumed run would not redo.
      if stop.signum is not None:
        stopped_at = experiment.step
        save_checkpoint(stopped_at)
        write(os.path.join(workdir, 'events.out.tfevents.*'), writer.flush)
        raise RunInterrupted(
            f'stopped by {signal.Signals(stop.signum).name} at step {stopped_at}; saved '
            f'{tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))}. Rerun the '
            'same command to resume', stop.signum)
      experiment.train_steps(tf.constant(min(STEPS_PER_CALL, target - experiment.step),
                                         tf.int64))
    steps_per_second = (target - step) / (time.perf_counter() - start)
    # Measurements come before the checkpoint that evaluation may write, so a
    # run resumed from that checkpoint already has them.
    measure()
    if target in eval_steps:
      evaluate_and_record(steps_per_second)
  if not metrics:
    log.info('run in %s already complete at step %d', workdir, experiment.step)
    metrics = experiment.evaluate()
  writer.close()
  if chief:
    write(os.path.join(workdir, workdir_lib.FINAL_METRICS_FILE),
          lambda: workdir_lib.save_final_metrics(workdir, experiment.step, metrics))
  return metrics


def _fmt(value: Optional[float]) -> str:
  return '-' if value is None else f'{value:.4f}'
