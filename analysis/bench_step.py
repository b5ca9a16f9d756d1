"""Time per training step: SGD, per-example-gradient SGD, winsorized SGD (reference, fast).

  python analysis/bench_step.py [--data_dir=../shared/data/mnist] [--c=2]

For each model (3x256 and 1x2048 at batch 100 by default) it times, in this one
process and interleaved round by round, the compiled in-graph loop of:
  sgd         plain SGD (the loss's batch gradient);
  sgd_forgetting  plain SGD counting forgetting events (--forgetting);
  trimmed_mean, median, l2clip, dp, m3, rm3, ra3
              the other aggregators (--aggregator; docs/aggregators.md):
              trimmed_mean drops as many values a side as c clips, l2clip
              and dp clip at C = 1, dp adds noise of multiplier 1;
  per_example per-example gradients by tf.vectorized_map, summed (what any
              per-example method pays before it does anything else);
  reference   winsorized SGD by vectorized_map + tfp.stats.percentile;
  top_k       winsorized SGD by materialised outer products + tf.math.top_k
              (the obvious fast path, kept here to show what the default beats);
  fast        winsorized SGD as run.py runs it by default: on a CPU by the
              compiled CPU kernel (cg_tf/cpu_kernel.py);
  xla         winsorized SGD by the XLA min/max network (--winsor_impl=xla,
              what GPUs and TPUs run), with the same bits as fast;
  authors     the authors' released update rule (google-research,
              coherent_gradients/iclr_2020_paper/utils.py): the layer's
              errors and inputs come back to the host, and NumPy forms the
              per-example gradients by einsum, takes np.percentile(...,
              [c, 100 - c], method='nearest') over the batch, clips and sums;
              one Python step at a time, as their session loop runs;
and prints ms per step and the ratio to the SGD step; each winsorized method
gets a row per --c. The last lines are `winsorized/sgd ratio (MODEL, c=C): X`,
X the fast path's ratio, for each model and c.

With --csv=PATH it also writes the rows that time a training step exactly as
run.py runs it (sgd, fast and the other aggregators; not the comparison
methods or the mirrored runs): hidden widths, batch size, the setting as
analysis/aggregators.py labels it (e.g. `winsorize c=2`, `trimmed_mean k=2`),
ms per step and the ratio to sgd. analysis/aggregators.py --step_times reads it.

With --cpu_replicas=N it also times sgd and fast under MirroredStrategy over N
logical CPU devices (`sgd_mirrored`, `fast_mirrored`: every replica computes
the whole batch, winsorization is split by output columns) beside the
one-device runs. On a CPU the replicas share the same cores, so this shows
what the replication costs, not a speed-up.
"""

import csv
import os
import platform
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from analysis import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import distribute  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import gradients  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import winsorize  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf.config import AGGREGATORS  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf.config import Config  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf.config import step_cost_setting  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf.errors import UserInputError  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string('data_dir', None, 'MNIST IDX directory; random data if unset.')
flags.DEFINE_list('c', ['2'], 'Winsorization percentiles; each winsorized method gets a row '
                  'per c, e.g. --c=1,2,4,8.')
flags.register_validator('c', lambda cs: all(_is_percentile(c) for c in cs),
                         'must be numbers in (0, 50), e.g. 1,2,4,8')
flags.DEFINE_multi_string('model', ['256,256,256', '2048'], 'Hidden widths of one model; '
                          'repeat the flag for several.')
flags.DEFINE_integer('batch_size', 100, 'Minibatch size.')
flags.DEFINE_float('seconds', 3.0, 'Rough time to spend on each measurement.')
flags.DEFINE_integer('rounds', 3, 'Interleaved rounds; the median is reported.')
flags.DEFINE_list('methods', ['sgd', 'sgd_forgetting', 'per_example', 'reference', 'top_k',
                              'fast', 'xla', 'authors', 'trimmed_mean', 'median', 'l2clip', 'dp',
                              'm3', 'rm3', 'ra3'],
                  'What to time.')
cli.define_output('csv', None, 'Also write the rows that time run.py\'s own training step '
                  'to this CSV (for analysis/aggregators.py --step_times).')
flags.DEFINE_integer('cpu_replicas', 0, 'Also time sgd and fast on this many logical CPU '
                     'replicas (MirroredStrategy); 0 = not.', lower_bound=0)
FLAGS = flags.FLAGS
# The methods that time the training step exactly as run.py runs it (--csv).
RUN_PY_STEPS = ('sgd', 'fast', 'trimmed_mean', 'median', 'l2clip', 'dp', 'm3', 'rm3', 'ra3')
# Timed once, not once per --c.
UNWINSORIZED = ('sgd', 'sgd_forgetting', 'per_example', 'median', 'l2clip', 'dp', 'm3', 'rm3',
                'ra3')


def _is_percentile(text):
  try:
    return 0 < float(text) < 50
  except ValueError:
    return False


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
    logits = self.model(images)
    return grads, tf.reduce_mean(gradients.per_example_loss(labels, logits)), logits


class TopKWinsorized(train.Experiment):
  """Winsorized SGD with per-example kernels materialised batch-last and tf.math.top_k."""

  def _gradients(self, images, labels):
    c = float(self.config.winsor_c)
    losses, logits, factors = gradients.dense_per_example_factors(self.model, images, labels,
                                                                  1.0 / self.batch_size)
    by_variable = {}
    for layer, a, delta in factors:
      by_variable[id(layer.kernel)] = top_k_winsorized_sum(tf.einsum('bi,bo->iob', a, delta), c)
      by_variable[id(layer.bias)] = top_k_winsorized_sum(tf.transpose(delta), c)
    return ([by_variable[id(v)] for v in self.model.trainable_variables], tf.reduce_mean(losses),
            logits)


def authors_winsorized_sums(a, delta, c):
  """The authors' released rule for one Dense layer, in NumPy on the host.

  Args:
    a: [batch, fan_in] the layer's inputs.
    delta: [batch, fan_out] the errors of the batch-mean loss.
    c: percentile.

  Returns:
    [kernel [fan_in, fan_out], bias [fan_out]]: per-example gradients formed by
    einsum (batch last, as their code does), clipped to np.percentile(...,
    [c, 100 - c], method='nearest') over the batch, and summed.
  """
  sums = []
  for per_example in (np.einsum('mo,mi->iom', delta, a), np.einsum('mo->om', delta)):
    low, high = np.percentile(per_example, [c, 100 - c], axis=-1, method='nearest',
                              keepdims=True)
    sums.append(np.clip(per_example, low, high).sum(axis=-1))
  return sums


class AuthorsRule(train.Experiment):
  """Winsorized SGD as the authors' released code computes it: NumPy on the host."""

  @tf.function
  def _factors(self, indices):
    _, _, factors = gradients.dense_per_example_factors(
        self.model, tf.gather(self.train_images, indices), tf.gather(self.train_labels, indices),
        1.0 / self.batch_size)
    return [(a, delta) for _, a, delta in factors]

  def train_steps(self, num_steps):
    c, rng = float(self.config.winsor_c), np.random.default_rng(0)
    for _ in range(int(num_steps)):
      indices = rng.choice(self.noisy.num_train, self.batch_size, replace=False)
      updates = []
      for a, delta in self._factors(indices):
        updates += authors_winsorized_sums(a.numpy(), delta.numpy(), c)
      self.optimizer.apply_gradients(zip(updates, self.model.trainable_variables))


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


def rows(methods, cs):
  """What is timed: 'sgd', 'per_example', and 'METHOD c=C' for each winsorized method and c."""
  return [m if m.replace('_mirrored', '') in UNWINSORIZED else f'{m} c={c:g}'
          for m in methods for c in (cs if m.replace('_mirrored', '') not in UNWINSORIZED
                                     else [0])]


def build(row, hidden, noisy, mirrored=None):
  """The Experiment that `row` times; methods ending in _mirrored run on `mirrored`."""
  method, _, c = row.partition(' c=')
  base = method.replace('_mirrored', '')
  c = float(c) if c else 0.0
  aggregator = base if base in AGGREGATORS else 'winsorize'
  config = Config(hidden=hidden, batch_size=FLAGS.batch_size,
                  winsor_c=c if aggregator == 'winsorize' else 0.0,
                  winsor_impl=base if base in ('reference', 'xla') else 'fast',
                  forgetting=base == 'sgd_forgetting', aggregator=aggregator,
                  trim_k=winsorize.nearest_ranks(c, FLAGS.batch_size)[0] if c else 0,
                  clip_norm=1.0 if aggregator in ('l2clip', 'dp') else 0.0,
                  noise_multiplier=1.0 if aggregator == 'dp' else 0.0)
  cls = {'per_example': PerExampleSgd, 'top_k': TopKWinsorized,
         'authors': AuthorsRule}.get(base, train.Experiment)
  return cls(config, noisy, mirrored if method.endswith('_mirrored') else None)


def time_steps(experiment, num_steps):
  start = time.perf_counter()
  experiment.train_steps(tf.constant(num_steps, tf.int64))
  experiment.optimizer.iterations.numpy()
  return (time.perf_counter() - start) / num_steps


def main(argv):
  del argv
  methods = list(FLAGS.methods)
  mirrored = None
  if FLAGS.cpu_replicas:
    mirrored = distribute.make_strategy('mirrored', cpu_replicas=FLAGS.cpu_replicas)
    methods += [f'{m}_mirrored' for m in ('sgd', 'fast') if m in methods]
  cs = [float(c) for c in FLAGS.c]
  if 'trimmed_mean' in methods:
    for c in cs:
      if winsorize.nearest_ranks(c, FLAGS.batch_size)[0] < 1:
        cli.fail(f'--c={c:g} clips no value a side of a batch of {FLAGS.batch_size}, so '
                 'trimmed_mean would drop none; use a larger --c or --batch_size, or leave '
                 'trimmed_mean out of --methods')
  methods = rows(methods, cs)
  try:
    noisy = dataset()
  except UserInputError as e:
    cli.fail(str(e))
  device = 'GPU: ' + tf.config.experimental.get_device_details(
      tf.config.list_physical_devices('GPU')[0]).get('device_name', '?') if \
      tf.config.list_physical_devices('GPU') else f'CPU: {os.cpu_count()} cores'
  machine = f'{platform.machine()} {device}'
  print(f'TensorFlow {tf.__version__}, {device}, batch {FLAGS.batch_size}')
  ratio_lines, csv_rows = [], []
  for spec in FLAGS.model:
    hidden = tuple(int(h) for h in spec.split(','))
    name = ('%dx%d' % (len(hidden), hidden[0]) if len(set(hidden)) == 1 else spec)
    experiments, steps = {}, {}
    for method in methods:
      experiments[method] = build(method, hidden, noisy, mirrored)
      time_steps(experiments[method], 2)  # trace and warm up
      once = time_steps(experiments[method], 3)
      steps[method] = max(3, int(FLAGS.seconds / once))
    timings = {method: [] for method in methods}
    for _ in range(FLAGS.rounds):
      for method in methods:
        timings[method].append(time_steps(experiments[method], steps[method]))
    ms = {method: 1000 * statistics.median(t) for method, t in timings.items()}
    print(f'\n{name} ({experiments[methods[0]].num_parameters:,} parameters)')
    print(f'  {"method":<22} {"ms/step":>10} {"ratio to sgd":>14}')
    for method in methods:
      print(f'  {method:<22} {ms[method]:>10.2f} {ms[method] / ms["sgd"]:>14.1f}')
    if mirrored is not None:
      print(f'  (each of the {FLAGS.cpu_replicas} replicas computes the whole batch and '
            f'winsorizes 1/{FLAGS.cpu_replicas} of the columns; the cross-replica sum moves '
            f'{4 * experiments[methods[0]].num_parameters / 1e6:.2f} MB a step, as for '
            'data-parallel SGD)')
    csv_rows += [{'hidden': ','.join(map(str, hidden)), 'batch_size': FLAGS.batch_size,
                  'setting': step_cost_setting(experiments[method].config),
                  'ms_per_step': round(ms[method], 4),
                  'ratio_to_sgd': round(ms[method] / ms['sgd'], 4),
                  'machine': machine, 'tensorflow': tf.__version__}
                 for method in methods if method.partition(' c=')[0] in RUN_PY_STEPS]
    ratio_lines += [f'winsorized/sgd ratio ({name}, c={c:g}): '
                    f'{ms[f"fast c={c:g}"] / ms["sgd"]:.1f}' for c in cs if f'fast c={c:g}' in ms]
  print('\n'.join(ratio_lines))
  if FLAGS.csv:
    with open(FLAGS.csv, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
      writer.writeheader()
      writer.writerows(csv_rows)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
