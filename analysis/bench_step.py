"""Time per training step: SGD, per-example-gradient SGD, winsorized SGD (reference, fast).

  python analysis/bench_step.py [--data_dir=../shared/data/mnist] [--c=2]

For each model (3x256 and 1x2048 at batch 100 by default) it times, in this one
process and interleaved round by round, the compiled in-graph loop of:
  sgd         plain SGD (the loss's batch gradient);
  per_example per-example gradients by tf.vectorized_map, summed (what any
              per-example method pays before it does anything else);
  reference   winsorized SGD by vectorized_map + tfp.stats.percentile;
  top_k       winsorized SGD by materialised outer products + tf.math.top_k
              (the obvious fast path, kept here to show what the default beats);
  fast        winsorized SGD by the XLA insertion network (the default);
and prints ms per step and the ratio to the SGD step. The last line is
`winsorized/sgd ratio (3x256, c=2): X`, X the fast path's ratio.
"""

import os
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cg_tf import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import gradients  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import winsorize  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf.config import Config  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string('data_dir', None, 'MNIST IDX directory; random data if unset.')
flags.DEFINE_float('c', 2.0, 'Winsorization percentile.')
flags.DEFINE_multi_string('model', ['256,256,256', '2048'], 'Hidden widths of one model; '
                          'repeat the flag for several.')
flags.DEFINE_integer('batch_size', 100, 'Minibatch size.')
flags.DEFINE_float('seconds', 3.0, 'Rough time to spend on each measurement.')
flags.DEFINE_integer('rounds', 3, 'Interleaved rounds; the median is reported.')
flags.DEFINE_list('methods', ['sgd', 'per_example', 'reference', 'top_k', 'fast'],
                  'What to time.')
FLAGS = flags.FLAGS


def dataset():
  if FLAGS.data_dir:
    full = data.load_idx_dir(FLAGS.data_dir)
    return data.make_noisy(full, 6000, 0.5, 0)
  rng = np.random.default_rng(0)
  images = (rng.random((6000, 784)) * (rng.random((6000, 784)) < 0.2)).astype(np.float32)
  labels = rng.integers(0, 10, 6000).astype(np.int32)
  return data.make_noisy(data.Dataset(images, labels, images[:100], labels[:100]), 0, 0.5, 0)


class PerExampleSgd(train.Experiment):
  """Plain SGD computed from vectorized_map per-example gradients (benchmark only)."""

  def _gradients(self, images, labels):
    per_example = gradients.per_example_gradients(self.model, gradients.per_example_loss,
                                                  images, labels)
    grads = [tf.reduce_sum(g, axis=0) / self.batch_size for g in per_example]
    return grads, tf.reduce_mean(gradients.per_example_loss(self.model(images), labels))


class TopKWinsorized(train.Experiment):
  """Winsorized SGD with per-example kernels materialised batch-last and tf.math.top_k."""

  def _gradients(self, images, labels):
    c = float(self.config.winsor_c)
    losses, factors = gradients.dense_per_example_factors(self.model, images, labels,
                                                          1.0 / self.batch_size)
    by_variable = {}
    for layer, a, delta in factors:
      by_variable[id(layer.kernel)] = top_k_winsorized_sum(tf.einsum('bi,bo->iob', a, delta), c)
      by_variable[id(layer.bias)] = top_k_winsorized_sum(tf.transpose(delta), c)
    return [by_variable[id(v)] for v in self.model.trainable_variables], tf.reduce_mean(losses)


def top_k_winsorized_sum(values, c):
  """[..., batch] -> [...]: the sum-minus-excess identity on top_k's extremes."""
  batch = values.shape[-1]
  low, high = winsorize.nearest_ranks(c, batch)
  num_high = batch - 1 - high
  total = tf.reduce_sum(values, axis=-1)
  largest = tf.math.top_k(values, num_high + 1).values
  total -= tf.reduce_sum(largest[..., :num_high], -1) - num_high * largest[..., num_high]
  smallest = -tf.math.top_k(-values, low + 1).values
  return total + low * smallest[..., low] - tf.reduce_sum(smallest[..., :low], -1)


def build(method, hidden, noisy):
  c = 0.0 if method in ('sgd', 'per_example') else FLAGS.c
  config = Config(hidden=hidden, batch_size=FLAGS.batch_size, winsor_c=c,
                  winsor_impl='reference' if method == 'reference' else 'fast')
  cls = {'per_example': PerExampleSgd, 'top_k': TopKWinsorized}.get(method, train.Experiment)
  return cls(config, noisy)


def time_steps(experiment, num_steps):
  start = time.perf_counter()
  experiment.train_steps(tf.constant(num_steps, tf.int64))
  experiment.optimizer.iterations.numpy()
  return (time.perf_counter() - start) / num_steps


def main(argv):
  del argv
  noisy = dataset()
  device = 'GPU: ' + tf.config.experimental.get_device_details(
      tf.config.list_physical_devices('GPU')[0]).get('device_name', '?') if \
      tf.config.list_physical_devices('GPU') else f'CPU: {os.cpu_count()} cores'
  print(f'TensorFlow {tf.__version__}, {device}, batch {FLAGS.batch_size}, c={FLAGS.c:g}')
  ratio_line = None
  for spec in FLAGS.model:
    hidden = tuple(int(h) for h in spec.split(','))
    name = ('%dx%d' % (len(hidden), hidden[0]) if len(set(hidden)) == 1 else spec)
    experiments, steps = {}, {}
    for method in FLAGS.methods:
      experiments[method] = build(method, hidden, noisy)
      time_steps(experiments[method], 2)  # trace and warm up
      once = time_steps(experiments[method], 3)
      steps[method] = max(3, int(FLAGS.seconds / once))
    timings = {method: [] for method in FLAGS.methods}
    for _ in range(FLAGS.rounds):
      for method in FLAGS.methods:
        timings[method].append(time_steps(experiments[method], steps[method]))
    ms = {method: 1000 * statistics.median(t) for method, t in timings.items()}
    print(f'\n{name} ({experiments[FLAGS.methods[0]].num_parameters:,} parameters)')
    print(f'  {"method":<12} {"ms/step":>10} {"ratio to sgd":>14}')
    for method in FLAGS.methods:
      print(f'  {method:<12} {ms[method]:>10.2f} {ms[method] / ms["sgd"]:>14.1f}')
    if name == '3x256' and 'fast' in ms:
      ratio_line = f'winsorized/sgd ratio (3x256, c={FLAGS.c:g}): {ms["fast"] / ms["sgd"]:.1f}'
  if ratio_line:
    print(ratio_line)


if __name__ == '__main__':
  app.run(main)
