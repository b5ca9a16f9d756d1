"""Time per training step: SGD, per-example-gradient SGD, winsorized SGD and the other aggregators.

  python analysis/bench_step.py [--data_dir=../shared/data/mnist] [--c=2]
  python analysis/bench_step.py --model=cnn --methods=sgd,fast,trimmed_mean,median,l2clip,dp,fallback \
      --c=2,8 --fit --memory

For each model (3x256 and 1x2048 MLPs at batch 100 by default; `--model=cnn`
is run.py's convolutional network) it times, in this one process and
interleaved round by round, the compiled in-graph loop of:
  sgd         plain SGD (the loss's batch gradient);
  sgd_forgetting  plain SGD counting forgetting events (--forgetting);
  trimmed_mean, median, l2clip, dp, m3, rm3, ra3
              the other aggregators (--aggregator; docs/aggregators.md):
              trimmed_mean drops as many values a side as c clips, l2clip
              and dp clip at C = 1, dp adds noise of multiplier 1;
  per_example per-example gradients by tf.vectorized_map over the whole
              model, summed (what any per-example method pays before it does
              anything else);
  reference   winsorized SGD by vectorized_map + tfp.stats.percentile;
  top_k       winsorized SGD by materialised per-example gradients and
              tf.math.top_k (the obvious fast path, kept to show what the
              default beats);
  fast        winsorized SGD as run.py runs it by default: per-example
              gradients by each layer's rule (cg_tf/gradients.py), order
              statistics by the compiled CPU kernel on a CPU;
  fallback    fast, but every layer's per-example gradients by the
              tf.vectorized_map rule, as a layer without a rule of its own
              gets them: what the per-layer rules save;
  xla         winsorized SGD by the XLA min/max network (--winsor_impl=xla,
              what GPUs and TPUs run), with the same bits as fast;
  authors     the authors' released update rule (google-research,
              coherent_gradients/iclr_2020_paper/utils.py): the layer's
              errors and inputs come back to the host, and NumPy forms the
              per-example gradients by einsum, takes np.percentile(...,
              [c, 100 - c], method='nearest') over the batch, clips and sums;
              one Python step at a time, as their session loop runs (MLPs);
and prints ms per step and the ratio to the SGD step; each winsorized method
gets a row per --c. The last lines are `winsorized/sgd ratio (MODEL, c=C): X`,
X the fast path's ratio, for each model and c.

With --fit it also times the model through Keras' own `fit` (plain, and
cg_tf.keras.with_aggregator with winsorize at each --c), per step after
compilation, as a user of `fit` pays it. With --memory it measures, in a child
process per method, the peak TensorFlow tensor memory of a training step
beyond what the model, optimizer and data hold, by TensorFlow's counting CPU
allocator (TF_CPU_ALLOCATOR_USE_BFC=true in the child).

With --csv=PATH it also writes the rows that time a training step exactly as
run.py runs it (sgd, fast and the other aggregators; not the comparison
methods or the mirrored runs): the model, batch size, the setting as
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
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from analysis import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import aggregators  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import distribute  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import gradients  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import winsorize  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf.config import Config  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf.errors import UserInputError  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """This script's flags, defined when it runs, so that other modules can import it."""
  flags.DEFINE_string('data_dir', None, 'MNIST IDX directory; random data if unset.')
  flags.DEFINE_list('c', ['2'], 'Winsorization percentiles; each winsorized method gets a row '
                    'per c, e.g. --c=1,2,4,8.')
  flags.register_validator('c', lambda cs: all(_is_percentile(c) for c in cs),
                           'must be numbers in (0, 50), e.g. 1,2,4,8')
  flags.DEFINE_multi_string('model', ['256,256,256', '2048'], "One model: the MLP's hidden "
                            "widths, or 'cnn'; repeat the flag for several.")
  flags.register_validator('model', lambda specs: all(_is_model(s) for s in specs),
                           "must be 'cnn' or comma-separated widths, e.g. 256,256,256")
  flags.DEFINE_integer('batch_size', 100, 'Minibatch size.')
  flags.DEFINE_float('seconds', 3.0, 'Rough time to spend on each measurement.')
  flags.DEFINE_integer('rounds', 3, 'Interleaved rounds; the median is reported.')
  flags.DEFINE_list('methods', ['sgd', 'sgd_forgetting', 'per_example', 'reference', 'top_k',
                                'fast', 'xla', 'authors', 'trimmed_mean', 'median', 'l2clip', 'dp',
                                'm3', 'rm3', 'ra3'],
                    'What to time.')
  flags.DEFINE_bool('fit', False, "Also time plain keras fit and cg_tf.keras.with_aggregator's "
                    'fit (winsorize at each --c), per step after compilation.')
  flags.DEFINE_bool('memory', False, 'Also measure the peak memory that training steps add, in a '
                    'child process per method (sgd and fast at each --c, or those --methods).')
  flags.DEFINE_string('memory_of', None, 'Internal: measure the peak memory of this method only.')
  cli.define_output('csv', None, 'Also write the rows that time run.py\'s own training step '
                    'to this CSV (for analysis/aggregators.py --step_times).')
  flags.DEFINE_integer('cpu_replicas', 0, 'Also time sgd and fast on this many logical CPU '
                       'replicas (MirroredStrategy); 0 = not.', lower_bound=0)


# The methods that time the training step exactly as run.py runs it (--csv).
RUN_PY_STEPS = ('sgd', 'fast', 'trimmed_mean', 'median', 'l2clip', 'dp', 'm3', 'rm3', 'ra3')
# Timed once, not once per --c.
UNWINSORIZED = ('sgd', 'sgd_forgetting', 'per_example', 'median', 'l2clip', 'dp', 'm3', 'rm3',
                'ra3')
# Rules for these comparison methods are the benchmark's own (below).
COMPARISONS = ('per_example', 'top_k', 'authors')


def _is_percentile(text):
  try:
    return 0 < float(text) < 50
  except ValueError:
    return False


def _is_model(spec):
  return spec == 'cnn' or all(width.strip().isdigit() for width in spec.split(','))


def dataset():
  if FLAGS.data_dir:
    full = data.load_idx_dir(FLAGS.data_dir)
    return data.make_noisy(full, 6000, 0.5, 0)
  rng = np.random.default_rng(0)
  images = (rng.random((6000, 784)) * (rng.random((6000, 784)) < 0.2)).astype(np.float32)
  labels = rng.integers(0, 10, 6000).astype(np.int32)
  return data.make_noisy(data.Dataset(images, labels, images[:100], labels[:100]), 0, 0.5, 0)


class PerExampleSum(aggregators.Aggregator):
  """Plain SGD computed from vectorized_map per-example gradients (benchmark only)."""
  name = 'per_example'

  @property
  def needs_per_example(self):
    return False

  def aggregate(self, minibatch):
    return [tf.reduce_sum(g, axis=0) / minibatch.batch_size for g in minibatch.vectorized_map()]


class TopKWinsorized(aggregators.Aggregator):
  """Winsorized SGD with each layer's per-example gradients materialised and tf.math.top_k."""
  name = 'top_k'

  def __init__(self, c):
    super().__init__()
    self.c = c

  def aggregate(self, minibatch):
    updates = []
    for v in minibatch.per_example():
      batch_last = tf.transpose(v.values(), [*range(1, v.shape.rank + 1), 0])
      updates.append(v.scatter(top_k_winsorized_sum(batch_last, self.c)))
    return updates


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
  """Winsorized SGD as the authors' released code computes it: NumPy on the host (MLPs)."""

  @tf.function
  def _factors(self, indices):
    images = tf.gather(self.train_images, indices)
    labels = tf.gather(self.train_labels, indices)
    with tf.GradientTape() as tape:
      with gradients.recording(self.model) as record:
        logits = self.model(images)
      loss = tf.reduce_sum(gradients.per_example_loss(labels, logits)) / self.batch_size
    return [layer.variables[0].outer for layer in record.gradients(tape, loss).layers]

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


def model_settings(spec):
  """Config settings of a --model: {'model': 'cnn'} or {'hidden': (256, 256, 256)}."""
  return {'model': 'cnn'} if spec == 'cnn' else {'hidden': tuple(int(h) for h in spec.split(','))}


def model_name(spec):
  if spec == 'cnn':
    return 'cnn'
  hidden = tuple(int(h) for h in spec.split(','))
  return '%dx%d' % (len(hidden), hidden[0]) if len(set(hidden)) == 1 else spec


def method_config(row, spec):
  """The Config whose training step `row` times (the comparison methods' nearest)."""
  method, _, c = row.partition(' c=')
  base = method.replace('_mirrored', '')
  c = float(c) if c else 0.0
  aggregator = base if base in aggregators.REGISTRY else 'winsorize'
  return Config(batch_size=FLAGS.batch_size, **model_settings(spec),
                winsor_c=c if aggregator == 'winsorize' and base not in COMPARISONS else 0.0,
                winsor_impl=base if base in ('reference', 'xla') else 'fast',
                forgetting=base == 'sgd_forgetting', aggregator=aggregator,
                trim_k=(winsorize.nearest_ranks(c, FLAGS.batch_size)[0]
                        if aggregator == 'trimmed_mean' else 0),
                clip_norm=1.0 if aggregator in ('l2clip', 'dp') else 0.0,
                noise_multiplier=1.0 if aggregator == 'dp' else 0.0)


def build(row, spec, noisy, mirrored=None):
  """The Experiment that `row` times; methods ending in _mirrored run on `mirrored`."""
  method, _, c = row.partition(' c=')
  base = method.replace('_mirrored', '')
  config = method_config(row, spec)
  strategy = mirrored if method.endswith('_mirrored') else None
  if base == 'authors':
    return AuthorsRule(config, noisy, strategy)
  aggregator = {'per_example': PerExampleSum, 'top_k': lambda: TopKWinsorized(float(c))}.get(
      base, lambda: None)()
  return train.Experiment(config, noisy, strategy, aggregator=aggregator)


def time_steps(experiment, num_steps):
  start = time.perf_counter()
  experiment.train_steps(tf.constant(num_steps, tf.int64))
  experiment.optimizer.iterations.numpy()
  return (time.perf_counter() - start) / num_steps


def warm_up(row, experiment):
  """Traces and runs the step; the fallback row traces with every layer on vectorized_map."""
  if row.startswith('fallback'):
    with gradients.vectorized_map_everywhere():
      time_steps(experiment, 2)
  else:
    time_steps(experiment, 2)


def time_fit(spec, noisy, cs):
  """{'fit sgd': ms, 'fit winsorize c=C': ms}: one step of keras fit, after compilation."""
  import keras  # pylint: disable=g-import-not-at-top
  import cg_tf.keras  # pylint: disable=g-import-not-at-top
  from cg_tf import model as model_lib  # pylint: disable=g-import-not-at-top
  x, y = noisy.data.train_images, noisy.train_labels
  steps = len(y) // FLAGS.batch_size
  models = {}
  for name, c in [('fit sgd', None), *((f'fit winsorize c={c:g}', c) for c in cs)]:
    settings = model_settings(spec)
    network = model_lib.build(settings.get('model', 'mlp'), x.shape[1],
                              settings.get('hidden', ()), data.NUM_CLASSES, 'paper', 0)
    model = network if c is None else cg_tf.keras.with_aggregator(
        network, aggregators.get('winsorize', c=c))
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, steps_per_epoch=2, verbose=0)
    models[name] = model
  timings = {name: [] for name in models}
  for _ in range(FLAGS.rounds):
    for name, model in models.items():
      start = time.perf_counter()
      model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, steps_per_epoch=steps, verbose=0)
      timings[name].append((time.perf_counter() - start) / steps)
  return {name: 1000 * statistics.median(t) for name, t in timings.items()}


def measure_memory(row, spec, noisy):
  """MB of TensorFlow tensor memory that a training step of `row` needs at its peak, beyond
  what the built model, optimizer and data hold (the child runs TensorFlow's counting CPU
  allocator, TF_CPU_ALLOCATOR_USE_BFC)."""
  experiment = build(row, spec, noisy)
  warm_up(row, experiment)
  before = tf.config.experimental.get_memory_info('CPU:0')['current']
  tf.config.experimental.reset_memory_stats('CPU:0')
  time_steps(experiment, 20)
  return (tf.config.experimental.get_memory_info('CPU:0')['peak'] - before) / 2**20


def memory_rows(spec, methods):
  """{row: MB} for each row, each measured in a child process of its own."""
  out = {}
  for row in methods:
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f'--model={spec}',
         f'--batch_size={FLAGS.batch_size}', f'--memory_of={row}',
         *([f'--data_dir={FLAGS.data_dir}'] if FLAGS.data_dir else [])],
        capture_output=True, text=True, check=True,
        env={**os.environ, 'TF_CPU_ALLOCATOR_USE_BFC': 'true'})
    out[row] = float(result.stdout.strip().splitlines()[-1])
  return out


def main(argv):
  del argv
  try:
    noisy = dataset()
  except UserInputError as e:
    cli.fail(str(e))
  if FLAGS.memory_of:
    print(f'{measure_memory(FLAGS.memory_of, FLAGS.model[0], noisy):.1f}')
    return
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
  if 'cnn' in FLAGS.model and 'authors' in methods:
    cli.fail("--methods=authors is the authors' rule for Dense layers; leave it out for "
             '--model=cnn')
  methods = rows(methods, cs)
  device = 'GPU: ' + tf.config.experimental.get_device_details(
      tf.config.list_physical_devices('GPU')[0]).get('device_name', '?') if \
      tf.config.list_physical_devices('GPU') else f'CPU: {os.cpu_count()} cores'
  machine = f'{platform.machine()} {device}'
  print(f'TensorFlow {tf.__version__}, {device}, batch {FLAGS.batch_size}')
  ratio_lines, csv_rows = [], []
  for spec in FLAGS.model:
    name = model_name(spec)
    experiments, steps = {}, {}
    for method in methods:
      experiments[method] = build(method, spec, noisy, mirrored)
      warm_up(method, experiments[method])
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
    if FLAGS.fit:
      fit_ms = time_fit(spec, noisy, cs)
      print('  through keras fit (per step, after compilation):')
      for method, value in fit_ms.items():
        print(f'  {method:<22} {value:>10.2f} {value / fit_ms["fit sgd"]:>14.1f}')
    if FLAGS.memory:
      measured = [m for m in methods if m.partition(' c=')[0] in ('sgd', 'fast')] or methods
      memory = memory_rows(spec, measured)
      print('  peak tensor memory of a step beyond the model and data (MB, a child each):')
      for method, value in memory.items():
        print(f'  {method:<22} {value:>10.1f}')
    csv_rows += [{'hidden': 'cnn' if spec == 'cnn' else spec.replace(' ', ''),
                  'batch_size': FLAGS.batch_size,
                  'setting': aggregators.step_cost_setting(experiments[method].config),
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
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
