"""What several test modules share, in one place: tiny datasets, configs and MNIST files;
finished runs with planted numbers; running scripts; and a zoo of small models, one per layer
type of gradients.RULES and one for its vectorized_map fallback."""

import gzip
import json
import os
import subprocess
import sys
from typing import Dict, Mapping, Optional

import keras
import numpy as np
import tensorflow as tf

from cg_tf import data
from cg_tf import model as model_lib
from cg_tf import train
from cg_tf import workdir
from cg_tf.config import Config


def write_run(run_dir: str, config: Config, scalars: Mapping[str, Mapping[int, float]],
              examples: Optional[Dict[str, np.ndarray]] = None,
              decomposition: Optional[Dict[str, np.ndarray]] = None) -> str:
  """A finished run directory holding exactly the numbers given, written as a run writes them.

  The same writers as cg_tf/train.py: workdir.prepare (config.json), a
  TensorBoard file writer (the scalars, step by step), workdir.save_examples,
  workdir.save_measurements and workdir.save_final_metrics, at config.steps,
  so the analysis scripts read the directory as a finished run.

  Args:
    run_dir: where to write.
    config: the run's settings; its `steps` is the final step.
    scalars: tag -> {step: value}.
    examples: examples.npz's arrays, if any.
    decomposition: decomposition.npz's arrays, if any.

  Returns:
    run_dir.
  """
  workdir.prepare(run_dir, config)
  writer = tf.summary.create_file_writer(run_dir)
  with writer.as_default():
    for tag, curve in scalars.items():
      for step, value in sorted(curve.items()):
        tf.summary.scalar(tag, value, step=step)
  writer.close()
  if examples is not None:
    workdir.save_examples(run_dir, examples)
  if decomposition is not None:
    workdir.save_measurements(run_dir, workdir.DECOMPOSITION_FILE, decomposition)
  final = {tag: float(curve[max(curve)]) for tag, curve in scalars.items()}
  workdir.save_final_metrics(run_dir, config.steps, final)
  return run_dir


def examples_record(corrupt: np.ndarray, first_learned_step: np.ndarray,
                    learned_since_step: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
  """examples.npz's arrays for examples with the given corrupt mask and first-learned steps
  (and learned-since steps: the first-learned ones unless given)."""
  n = len(corrupt)
  labels = np.arange(n, dtype=np.int32) % 10
  return {'label': labels, 'train_label': np.where(corrupt, (labels + 1) % 10, labels),
          'corrupt': np.asarray(corrupt, bool), 'subset_index': np.arange(n),
          'first_learned_step': np.asarray(first_learned_step, np.int64),
          'learned_since_step': np.asarray(first_learned_step if learned_since_step is None
                                           else learned_since_step, np.int64)}


def decomposition_record(steps, f_pristine, corrupt: np.ndarray,
                         sampled_offset: float = 0.0) -> Dict[str, np.ndarray]:
  """decomposition.npz's arrays with the given f^p per step and world, <g, g> = 1.

  Args:
    steps: [T] measurement steps.
    f_pristine: [T, worlds]: f^p of the actual designation (world 0) and of
      the null worlds; f^c = 1 - f^p.
    corrupt: [n] the actual corrupt mask (the null worlds get its reverse).
    sampled_offset: the sampled estimator's f^p is the exact one plus this.
  """
  f_pristine = np.asarray(f_pristine, np.float64)
  inner = np.stack([f_pristine, 1.0 - f_pristine], axis=-1)
  sampled = np.stack([f_pristine + sampled_offset, 1.0 - f_pristine - sampled_offset], axis=-1)
  worlds = f_pristine.shape[1]
  designations = np.stack([corrupt] + [corrupt[::-1]] * (worlds - 1))
  return {'step': np.asarray(steps), 'inner': inner, 'sampled_inner': sampled,
          'seconds': np.full(len(steps), 0.5), 'corrupt': designations}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def replica_runs(replicas: int, cases: Dict[str, dict], workdir: str):
  """tests/replica_runs.py in its own process: {name: (final metrics, checkpointed arrays)}.

  Logical CPU devices are set before TensorFlow starts, so each replica
  count is a process of its own.
  """
  result = subprocess.run([sys.executable, '-m', 'tests.replica_runs', str(replicas),
                           json.dumps(cases), workdir], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
  if result.returncode:
    raise AssertionError(result.stderr[-3000:])
  final_metrics = json.loads(result.stdout.strip().splitlines()[-1])
  runs = {}
  for name, metrics in final_metrics.items():
    with np.load(os.path.join(workdir, name, 'weights.npz')) as arrays:
      runs[name] = metrics, dict(arrays)
  return runs


def run_path(out: str, name: str) -> str:
  return os.path.join(out, 'runs', name)


class Scale(keras.layers.Layer):
  """A layer without a rule in gradients.RULES (so its per-example gradients come from
  tf.vectorized_map): sin(x * w) + b, elementwise."""

  def build(self, input_shape):
    self.w = self.add_weight(shape=(input_shape[-1],), initializer='ones', name='w')
    self.b = self.add_weight(shape=(input_shape[-1],), initializer='zeros', name='b')

  def call(self, x):
    return tf.sin(x * self.w) + self.b


def _layers(name, dtype):
  """The layers of zoo model `name`, each in `dtype`."""
  kind = {'dtype': dtype}
  return {
      'dense': [keras.layers.Dense(5, activation='relu', **kind),
                keras.layers.Dense(4, activation='tanh', use_bias=False, **kind),
                keras.layers.Dense(3, **kind)],
      'dense_3d': [keras.layers.Dense(6, activation='relu', **kind), keras.layers.Flatten(),
                   keras.layers.Dense(3, **kind)],
      'conv2d': [keras.layers.Conv2D(4, 3, strides=2, padding='same', activation='relu', **kind),
                 keras.layers.Conv2D(3, 2, dilation_rate=2, use_bias=False, **kind),
                 keras.layers.MaxPooling2D(1), keras.layers.Flatten(),
                 keras.layers.Dense(3, **kind)],
      'conv1d': [keras.layers.Conv1D(4, 3, padding='causal', dilation_rate=2, activation='relu',
                                     **kind),
                 keras.layers.Conv1D(2, 2, strides=2, **kind), keras.layers.Flatten(),
                 keras.layers.Dense(3, **kind)],
      'embedding': [keras.layers.Embedding(50, 3, **kind), keras.layers.Flatten(),
                    keras.layers.Dense(3, **kind)],
      'layer_norm': [keras.layers.Dense(8, **kind), keras.layers.LayerNormalization(**kind),
                     keras.layers.Dense(3, **kind)],
      'group_norm': [keras.layers.Conv2D(4, 3, **kind),
                     keras.layers.GroupNormalization(groups=2, **kind), keras.layers.Flatten(),
                     keras.layers.Dense(3, **kind)],
      'vectorized_map': [keras.layers.Dense(4, **kind), Scale(**kind),
                         keras.layers.Dense(3, **kind)],
  }[name]


ZOO_INPUTS = {'dense': (6,), 'dense_3d': (4, 5), 'conv2d': (7, 7, 2), 'conv1d': (10, 3),
              'embedding': (4,), 'layer_norm': (6,), 'group_norm': (6, 6, 4),
              'vectorized_map': (5,)}
ZOO = tuple(ZOO_INPUTS)


def zoo_model(name: str, dtype: str = 'float32', seed: int = 0) -> keras.Model:
  """A small model with the layer type `name` tests, its weights drawn (biases nonzero) by `seed`.

  The same name and seed give the same weights in float32 and float64.
  """
  inputs = keras.Input(ZOO_INPUTS[name], dtype='int32' if name == 'embedding' else dtype)
  model = keras.Sequential([inputs, *_layers(name, dtype)], name=name)
  rng = np.random.default_rng(seed)
  model.set_weights([rng.normal(0, 0.7, w.shape).astype(dtype) for w in model.get_weights()])
  return model


def zoo_batch(name: str, batch: int, seed: int = 0):
  """(x, y) for zoo model `name`: random inputs with exact zeros, and ties: the last
  example repeats the first (inputs and label) when batch > 2."""
  rng = np.random.default_rng(seed + 100)
  shape = (batch, *ZOO_INPUTS[name])
  if name == 'embedding':
    x = rng.integers(0, 50, shape).astype(np.int32)
  else:
    x = (rng.normal(size=shape) * (rng.random(shape) < 0.7)).astype(np.float32)
  y = rng.integers(0, 3, batch).astype(np.int32)
  if batch > 2:
    x[-1], y[-1] = x[0], y[0]
  return x, y


# ----------------------------------------------------------------------------
# Data, configs, runs and scripts.


def separable_dataset(num_train=200, num_test=100, dims=12, seed=0):
  """Ten Gaussian clusters, far apart: learnable to 100% by a small MLP."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, 3, (10, dims))

  def draw(n):
    labels = rng.integers(0, 10, n).astype(np.int32)
    return (centres[labels] + rng.normal(0, 0.5, (n, dims))).astype(np.float32), labels

  return data.Dataset(*draw(num_train), *draw(num_test))


def tiny_config(**overrides):
  settings = dict(hidden=(16,), batch_size=20, steps=20, eval_every=10, checkpoint_every=10,
                  learning_rate=0.1, eval_batch_size=64)
  settings.update(overrides)
  return Config(**settings)


def final_weights(config, dataset, workdir):
  train.train_and_evaluate(config, workdir, dataset)
  restored = train.Experiment(config, data.make_noisy(dataset, config.train_size, config.noise,
                                                       config.noise_seed))
  tf.train.Checkpoint(model=restored.model).read(
      tf.train.latest_checkpoint(os.path.join(workdir, 'checkpoints'))).expect_partial()
  return [v.numpy() for v in restored.model.trainable_variables]


def write_idx(path, array):
  """Writes an IDX file the way the format's definition says (the test's own writer)."""
  codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
  header = bytes([0, 0, codes[array.dtype.type], array.ndim])
  header += b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
  payload = header + array.astype(array.dtype.newbyteorder('>')).tobytes()
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(payload)


def write_fake_mnist(directory, num_train=200, num_test=50, seed=0, gz=True):
  """Four IDX files of random 28x28 'digits' whose class shows in their brightness."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for prefix, n in (('train', num_train), ('t10k', num_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    images[np.arange(n), labels, :] = 255  # one bright row per class: learnable
    suffix = '.gz' if gz else ''
    write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte{suffix}'), images)
    write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte{suffix}'), labels)
  return directory


def fake_mnist_dir(name, num_train, num_test=100):
  """write_fake_mnist into a directory of this test process's own, named `name`."""
  return write_fake_mnist(
      os.path.join(os.environ.get('TEST_TMPDIR', '/tmp'), f'cg_tf_fake_mnist_{name}_{os.getpid()}'),
      num_train=num_train, num_test=num_test)


def run_script(name, *args):
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', name), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def add_unknown_setting(run_dir):
  """Makes run_dir's config.json look written by a later cg_tf, with a setting this one lacks."""
  path = os.path.join(run_dir, workdir.CONFIG_FILE)
  with open(path) as f:
    settings = json.load(f)
  with open(path, 'w') as f:
    json.dump({**settings, 'future_setting': 1}, f)


def row_for(table, prefix):
  return next(line for line in table.splitlines() if line.startswith(prefix))


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


def layer_factors(kind, batch, fan_in, fan_out, seed):
  """A Dense layer's inputs a [batch, fan_in] (>= 0) and errors d [batch, fan_out], float32."""
  rng = np.random.default_rng(seed)
  a = np.maximum(rng.normal(size=(batch, fan_in)), 0)
  a[rng.random(a.shape) < 0.5] = 0  # blank pixels, inactive ReLUs
  d = rng.normal(size=(batch, fan_out)) / 100
  if kind == 'ties':  # few distinct values: ties at every rank
    a, d = np.round(a * 2) / 2, np.round(d * 300) / 300
  elif kind == 'sparse_errors':  # inactive units pass back exact zeros
    d[rng.random(d.shape) < 0.6] = 0
  elif kind == 'blank_rows':  # inputs that no example sets, and one that all do
    a[:, ::3] = 0
    a[:, 1] = 1.0
  elif kind == 'one_class':  # every example the same, as a batch of one class can be
    a[:], d[:] = a[0], d[0]
  elif kind == 'negative_inputs':  # inputs of either sign (e.g. normalised pixels)
    a = rng.normal(size=(batch, fan_in))
  return a.astype(np.float32), d.astype(np.float32)
