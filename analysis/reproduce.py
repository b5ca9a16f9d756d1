"""One command reproduces the paper: every run, every figure, REPORT.md.

  python analysis/reproduce.py --scale=mini --data_dir=../shared/data/mnist --out=repro

`mini` uses the CPU-sized flagfiles (flags/*_cpu.cfg) and `full` the paper's.
Runs go to OUT/runs/, logs to OUT/logs/, and figures and REPORT.md to OUT/.
Finished runs are reused, interrupted ones resume from their checkpoints, and
`--parallel` runs several at once. `--seeds=N` repeats every run with
seed = noise_seed = 0..N-1; the report counts the seeds that agree with each
claim, and the figures draw the mean over seeds with a min-max band.

The aggregator experiments also time one step of every rule of their grid
(analysis/bench_step.py, alone, once the runs are done) into OUT/step_times.csv,
the tables' "step ÷ SGD" column.

§2.4's decomposition only observes training (it changes no numbers), so the
label-noise runs at 25, 50 and 75% noise record it as they go: Figures 1, 2
and 3 come from the same 5 runs per seed.
"""

import concurrent.futures
import fnmatch
import functools
import queue
import re
import os
import platform
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from analysis import claims  # pylint: disable=g-import-not-at-top,wrong-import-position
from analysis import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import workdir  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf.errors import UserInputError  # pylint: disable=g-import-not-at-top,wrong-import-position

# §4's full-batch gradient descent, with an SGD run on the same examples beside each.
PAPER_EXPERIMENTS = ('label_noise', 'decomposition', 'winsorized', 'full_batch')
# Not in the paper, so not run by default: coherence measured directly
# (docs/coherence.md) and the aggregator comparison (docs/aggregators.md), on
# 12,000 examples and, for the cheap rules, on all 60,000 (aggregators_60k).
# The paper's Figures 1-4 on a convolutional network (run.py --model=cnn): its
# own report, REPORT_cnn.md, beside the MLP's; with m-coherence and forgetting
# measured on it as the coherence experiment measures them on the MLP.
EXPERIMENTS = (*PAPER_EXPERIMENTS, 'coherence', 'aggregators', 'aggregators_60k', 'cnn')
FLAGS = flags.FLAGS


def define_flags():
  """This script's flags, defined when it runs, so that other modules can import it."""
  flags.DEFINE_enum('scale', 'mini', ['mini', 'full'], 'mini: 2 CPU cores; full: the paper.')
  flags.DEFINE_string('out', 'repro', 'Output directory.')
  flags.DEFINE_string('data_dir', None, 'MNIST IDX directory (else tfds).')
  flags.DEFINE_integer('seeds', 1, 'Seeds per run.', lower_bound=1)
  flags.DEFINE_integer('parallel', 1, 'Runs at once.', lower_bound=1)
  flags.DEFINE_list('experiments', list(PAPER_EXPERIMENTS), 'Which experiments to run: '
                    f'some of {", ".join(EXPERIMENTS)}.')
  flags.DEFINE_list('only', [], 'Run only the runs whose name matches one of these shell '
                    "patterns, e.g. 'winsorized/n1_c*,label_noise/noise0'; figures and the "
                    'report are drawn once every run is finished.')
  flags.DEFINE_string('shard', None, 'K/N: run only the K-th (1..N) of N fixed parts of the runs, '
                      'so that N machines sharing one --out split the work.')
  flags.DEFINE_list('devices', [], 'GPU indices, e.g. 0,1,2,3: each run gets one of them '
                    '(CUDA_VISIBLE_DEVICES) and as many runs go at once.')
  flags.DEFINE_bool('list', False, 'Print the run.py command of every selected run and exit.')
  flags.DEFINE_bool('report_only', False, 'Train nothing: draw the figures and the report from the '
                    'runs under OUT that are finished (e.g. the committed results/full).')
  flags.DEFINE_string('report_dir', None, 'Where the figures and REPORT.md (REPORT_full.md at '
                      'full scale) go; default OUT.')
  flags.DEFINE_string('compare_with', None, 'Another REPORT.md (e.g. docs/REPORT.md, the mini '
                      'one): the report shows its measurement and verdict beside each claim.')
  flags.register_validator(
      'shard', lambda v: v is None or bool(re.fullmatch(r'[1-9]\d*/[1-9]\d*', v))
      and int(v.split('/')[0]) <= int(v.split('/')[1]), 'must be K/N with 1 <= K <= N, e.g. 2/3')
  flags.register_validator('devices', lambda v: all(d.isdigit() for d in v),
                           'must be GPU indices, e.g. 0,1,2,3')
  flags.register_validator('experiments', lambda names: set(names) <= set(EXPERIMENTS),
                           f'must name some of {", ".join(EXPERIMENTS)}')


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISES = (0.0, 0.25, 0.5, 0.75, 1.0)
DECOMPOSITION_NOISES = (0.25, 0.5, 0.75)
CS = (0, 1, 2, 4, 8)
# The CNN's Figure 1 runs that do not fit their training set in 60,000 steps,
# run again for 200,000 (flags/cnn_label_noise_long.cfg); at mini scale they fit.
CNN_LONG_NOISES = (0.5, 0.75, 1.0)
AGGREGATOR_NOISES = (0.0, 0.5, 1.0)
# Every aggregator over a small grid of its own setting, fixed in advance.
# Clipping every example to norm C = 1 also shortens the step (per-example
# norms start near 19), so SGD at a 10x and 20x smaller learning rate is the
# control that separates robustness from step size.
AGGREGATOR_GRID = (
    ('mean', []),
    *((f'mean_lr{lr:g}', [f'--learning_rate={lr}']) for lr in (0.01, 0.005)),
    *((f'winsorize_c{c}', ['--aggregator=winsorize', f'--winsor_c={c}']) for c in (1, 2, 4)),
    *((f'trimmed_mean_k{k}', ['--aggregator=trimmed_mean', f'--trim_k={k}']) for k in (1, 2, 4)),
    ('median', ['--aggregator=median']),
    ('m3', ['--aggregator=m3']), ('rm3', ['--aggregator=rm3']), ('ra3', ['--aggregator=ra3']),
    *((f'l2clip_C{c:g}', ['--aggregator=l2clip', f'--clip_norm={c}']) for c in (1.0, 10.0)),
    *((f'dp_C1_sigma{s:g}', ['--aggregator=dp', '--clip_norm=1', f'--noise_multiplier={s}'])
      for s in (0.5, 1.0)),
)
# The rules cheap enough to run on the whole training set (at most ~3x an SGD
# step; docs/aggregators.md), in the Figure 4 set-up, whose winsorized runs
# (c = 0, plain SGD, to 8) complete the comparison. The trimmed mean at k = 2
# and 4 joined when the CPU kernel made it as cheap as k = 1; the median is not.
CHEAP_AGGREGATORS = ('mean_lr0.01', 'mean_lr0.005', 'trimmed_mean_k1', 'trimmed_mean_k2',
                     'trimmed_mean_k4', 'm3', 'rm3', 'ra3', 'l2clip_C1', 'l2clip_C10',
                     'dp_C1_sigma0.5', 'dp_C1_sigma1')
# The aggregator tables' "step ÷ SGD" column: analysis/bench_step.py times
# run.py's step for every rule of both grids (winsorize to c = 8 for the
# 60,000-example table) on the grids' network, alone, once the runs are done.
STEP_TIMES_FILE = 'step_times.csv'
STEP_TIMES_BENCH = ('--model=256,256,256', '--c=1,2,4,8',
                    '--methods=sgd,fast,trimmed_mean,median,l2clip,dp,m3,rm3,ra3')


def label_noise_levels(experiments):
  """The noise levels of the plain-SGD runs that `experiments` need."""
  if 'label_noise' in experiments:
    return NOISES
  return DECOMPOSITION_NOISES if 'decomposition' in experiments else ()


def cnn_fit_runs():
  """{noise: run name} of the CNN's Figure 1 given time to fit its training set: the
  60,000-step plain-SGD run at 0 and 25% noise, the 200,000-step one at 50-100%."""
  return {n: f'cnn/long_n{n:g}' if n in CNN_LONG_NOISES else f'cnn/n{n:g}_c0' for n in NOISES}


def seed_suffix(seed):
  """What a run directory's name ends with for `seed`: nothing for seed 0, else _s<seed>."""
  return '' if seed == 0 else f'_s{seed}'


def seed_dirs(path, seeds):
  """The run directory `path` for each of seeds 0..seeds-1."""
  return [path + seed_suffix(seed) for seed in range(seeds)]


def run_specs(scale, seeds, experiments):
  """[(run name, [run.py flags])] for the experiments at `scale`."""
  suffix = '_cpu' if scale == 'mini' else ''
  specs = []
  for seed in range(seeds):
    tag = seed_suffix(seed)
    seeding = [f'--seed={seed}', f'--noise_seed={seed}']
    for n in label_noise_levels(experiments):
      flagfile = ('decomposition' if 'decomposition' in experiments and n in DECOMPOSITION_NOISES
                  else 'label_noise')
      specs.append((f'label_noise/noise{n:g}{tag}',
                    [f'--flagfile=flags/{flagfile}{suffix}.cfg', f'--noise={n}', *seeding]))
    if 'coherence' in experiments:
      specs += [(f'coherence/noise{n:g}{tag}', [f'--flagfile=flags/coherence{suffix}.cfg',
                                                f'--noise={n}', *seeding]) for n in NOISES]
    if 'aggregators' in experiments:
      specs += [(f'aggregators/n{n:g}_{label}{tag}',
                 [f'--flagfile=flags/aggregators{suffix}.cfg', f'--noise={n}', *args, *seeding])
                for n in AGGREGATOR_NOISES for label, args in AGGREGATOR_GRID]
    if 'aggregators_60k' in experiments:
      specs += [(f'aggregators_60k/n{n:g}_{label}{tag}',
                 [f'--flagfile=flags/winsorized{suffix}.cfg', f'--noise={n}', *args, *seeding])
                for n in AGGREGATOR_NOISES for label, args in AGGREGATOR_GRID
                if label in CHEAP_AGGREGATORS]
    if 'full_batch' in experiments:
      specs += [(f'full_batch/{method}_noise{n:g}{tag}',
                 [f'--flagfile=flags/{flagfile}{suffix}.cfg', f'--noise={n}', *seeding])
                for n in NOISES for method, flagfile in (('gd', 'full_batch'),
                                                         ('sgd', 'full_batch_sgd'))]
    if 'cnn' in experiments:
      # Figure 1 is the grid's c = 0 row; at 25-75% noise it records §2.4 too.
      specs += [(f'cnn/n{n:g}_c{c}{tag}',
                 [f'--flagfile=flags/cnn_'
                  f'{"decomposition" if c == 0 and n in DECOMPOSITION_NOISES else "winsorized"}'
                  f'{suffix}.cfg', f'--noise={n}', f'--winsor_c={c}', *seeding])
                for n in NOISES for c in CS]
      specs += [(f'cnn/coherence_n{n:g}{tag}',
                 [f'--flagfile=flags/cnn_coherence{suffix}.cfg', f'--noise={n}', *seeding])
                for n in NOISES]
      if scale == 'full':
        specs += [(f'cnn/long_n{n:g}{tag}',
                   ['--flagfile=flags/cnn_label_noise_long.cfg', f'--noise={n}', *seeding])
                  for n in CNN_LONG_NOISES]
    if 'winsorized' in experiments:
      specs += [(f'winsorized/n{n:g}_c{c}{tag}',
                 [f'--flagfile=flags/winsorized{suffix}.cfg', f'--noise={n}', f'--winsor_c={c}',
                  *seeding]) for n in NOISES for c in CS]
  return specs


def winsor_c(args):
  """The --winsor_c among run.py flags `args`; 0 if absent."""
  values = [float(arg.split('=', 1)[1]) for arg in args if arg.startswith('--winsor_c=')]
  return values[-1] if values else 0.0


def unfinished(specs, out):
  """The specs whose run directory under OUT/runs is missing or not finished."""
  return [(name, args) for name, args in specs
          if not workdir.is_finished(os.path.join(out, 'runs', name))]


def selected(specs, patterns):
  """The specs whose name matches one of the shell-style `patterns` (all if none)."""
  if not patterns:
    return specs
  return [(name, args) for name, args in specs
          if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]


def shard(specs, k, n):
  """The k-th (1-based) of n parts of `specs`: every run is in exactly one part.

  Runs are dealt round-robin in descending order of cost (c), so the parts
  cost about the same; the parts depend only on the specs.
  """
  ordered = sorted(specs, key=lambda spec: (-winsor_c(spec[1]), spec[0]))
  return [spec for i, spec in enumerate(ordered) if i % n == k - 1]


def command(name, args, out, data_dir):
  """The run.py command line of one run."""
  line = [sys.executable, os.path.join(ROOT, 'run.py'), *args,
          f'--logdir={os.path.join(out, "runs", name)}']
  if data_dir:
    line.append(f'--data_dir={os.path.abspath(data_dir)}')
  return line


def run_all(specs, out, data_dir, parallel, devices=()):
  """Runs what is missing or unfinished, printing progress.

  With `devices`, each run gets one GPU of the list to itself, and as many run at once.

  Returns:
    (how many runs were started, [names of the runs that failed]).
  """
  todo = unfinished(specs, out)
  free_devices = queue.Queue()
  for device in devices:
    free_devices.put(device)
  parallel = len(devices) or parallel
  # Winsorizing costs about c + 1 times more per step: start the costliest runs
  # first so that parallel workers finish together.
  todo.sort(key=lambda spec: -winsor_c(spec[1]))
  print(f'{len(specs) - len(todo)} of {len(specs)} runs already finished; {len(todo)} to run',
        flush=True)
  lock, done, failed, start = threading.Lock(), [0], [], time.time()

  def one(spec):
    name, args = spec
    log_path = os.path.join(out, 'logs', name + '.log')
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ)
    device = free_devices.get() if devices else None
    if device is not None:
      env['CUDA_VISIBLE_DEVICES'] = device
    began = time.time()
    try:
      with open(log_path, 'a') as log:
        code = subprocess.call(command(name, args, out, data_dir), cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    finally:
      if device is not None:
        free_devices.put(device)
    with lock:
      done[0] += 1
      if code:
        failed.append(name)
      # No ETA: runs differ in cost by 30x (c = 8 against c = 0), so an average misleads.
      print(f'[{done[0]}/{len(todo)}] {name}: {"FAILED, see " + log_path if code else "done"} '
            f'in {time.time() - began:.0f} s; {(time.time() - start) / 60:.1f} min so far',
            flush=True)

  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    list(pool.map(one, todo))
  return len(todo), failed


def measure_step_times(out, data_dir):
  """Writes OUT/step_times.csv by analysis/bench_step.py unless it exists; says where it went.

  A failed benchmark costs the tables their step-time column, not the runs.
  """
  path = os.path.join(out, STEP_TIMES_FILE)
  if os.path.exists(path):
    return
  log_path = os.path.join(out, 'logs', 'step_times.log')
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  print(f'timing one step of each aggregator (analysis/bench_step.py, a few minutes): {log_path}',
        flush=True)
  line = [sys.executable, os.path.join(ROOT, 'analysis', 'bench_step.py'), *STEP_TIMES_BENCH,
          f'--csv={path}.tmp']
  if data_dir:
    line.append(f'--data_dir={os.path.abspath(data_dir)}')
  with open(log_path, 'w') as log:
    code = subprocess.call(line, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  if code:
    print(f'reproduce.py: warning: the step-time benchmark failed (see {log_path}); the '
          'aggregator tables go without their step-time column', file=sys.stderr)
    return
  os.replace(f'{path}.tmp', path)


def figure_name(number, scale, family=''):
  """figureN.png at mini scale, figureN_full.png at full scale; with family 'cnn',
  figureN_cnn.png and figureN_cnn_mini.png."""
  if family:
    return f'figure{number}_{family}{"" if scale == "full" else "_mini"}.png'
  return f'figure{number}{"_full" if scale == "full" else ""}.png'


def coherence_names(scale, family=''):
  """(figure, table) of the coherence measurements: coherence.png and COHERENCE.md for
  the MLP; coherence_cnn.png and COHERENCE_cnn.md (_cnn_mini at mini scale) for the CNN."""
  if not family:
    return 'coherence.png', 'COHERENCE.md'
  tag = f'_{family}{"" if scale == "full" else "_mini"}'
  return f'coherence{tag}.png', f'COHERENCE{tag}.md'


def aggregators_names(scale):
  """(figure, table) of the aggregator comparison: aggregators.png and AGGREGATORS.md
  for the 2,500-example mini runs, with _12k at full scale (12,000 examples)."""
  suffix = '_12k' if scale == 'full' else ''
  return f'aggregators{suffix}.png', f'AGGREGATORS{suffix}.md'


def draw_figures(out, seeds, experiments, report_dir, scale):
  """Draws each figure from the finished runs it needs into `report_dir`; runs not finished are
  left out (Figure 4 marks their cells 'not run').

  Returns:
    The file names of the figures drawn.
  """
  runs = os.path.join(out, 'runs')
  step_times = os.path.join(out, STEP_TIMES_FILE)
  step_time_args = [f'--step_times={step_times}'] if os.path.exists(step_times) else []

  def finished(names):
    return [run_dir for name in names for run_dir in seed_dirs(os.path.join(runs, name), seeds)
            if workdir.is_finished(run_dir)]

  scripts = []
  if 'label_noise' in experiments:
    scripts.append((figure_name(1, scale), 'figure1.py',
                    finished(f'label_noise/noise{n:g}' for n in NOISES),
                    [f'--out={report_dir}/{figure_name(1, scale)}']))
  if 'decomposition' in experiments:
    scripts.append((figure_name(2, scale), 'figures_2_3.py',
                    finished(f'label_noise/noise{n:g}' for n in DECOMPOSITION_NOISES),
                    [f'--out_dir={report_dir}', '--suffix=' + ('_full' if scale == 'full' else '')]))
  if 'winsorized' in experiments:
    scripts.append((figure_name(4, scale), 'figure4.py',
                    finished(f'winsorized/n{n:g}_c{c}' for n in NOISES for c in CS),
                    [f'--out={report_dir}/{figure_name(4, scale)}']))
  if 'full_batch' in experiments:
    name = f'full_batch{"_full" if scale == "full" else ""}.png'
    scripts.append((name, 'full_batch.py',
                    finished(f'full_batch/{method}_noise{n:g}' for n in NOISES
                             for method in ('gd', 'sgd')),
                    [f'--out={report_dir}/{name}']))
  if 'cnn' in experiments:
    scripts.append((figure_name(1, scale, 'cnn'), 'figure1.py',
                    finished(f'cnn/n{n:g}_c0' for n in NOISES),
                    [f'--out={report_dir}/{figure_name(1, scale, "cnn")}']))
    if scale == 'full':
      scripts.append(('figure1_cnn_long.png', 'figure1.py', finished(cnn_fit_runs().values()),
                      [f'--out={report_dir}/figure1_cnn_long.png']))
    scripts.append((figure_name(2, scale, 'cnn'), 'figures_2_3.py',
                    finished(f'cnn/n{n:g}_c0' for n in DECOMPOSITION_NOISES),
                    [f'--out_dir={report_dir}',
                     '--suffix=' + figure_name(2, scale, 'cnn')[len('figure2'):-len('.png')]]))
    scripts.append((figure_name(4, scale, 'cnn'), 'figure4.py',
                    finished(f'cnn/n{n:g}_c{c}' for n in NOISES for c in CS),
                    [f'--out={report_dir}/{figure_name(4, scale, "cnn")}']))
    figure, table = coherence_names(scale, 'cnn')
    scripts.append((figure, 'coherence.py', finished(f'cnn/coherence_n{n:g}' for n in NOISES),
                    [f'--out={report_dir}/{figure}', f'--report={report_dir}/{table}']))
  if 'coherence' in experiments:
    figure, table = coherence_names(scale)
    scripts.append((figure, 'coherence.py', finished(f'coherence/noise{n:g}' for n in NOISES),
                    [f'--out={report_dir}/{figure}', f'--report={report_dir}/{table}']))
  if 'aggregators' in experiments:
    figure, table = aggregators_names(scale)
    scripts.append((figure, 'aggregators.py',
                    finished(f'aggregators/n{n:g}_{label}' for n in AGGREGATOR_NOISES
                             for label, _ in AGGREGATOR_GRID),
                    [f'--out={report_dir}/{figure}', f'--report={report_dir}/{table}',
                     *step_time_args]))
  if 'aggregators_60k' in experiments:
    scripts.append(('aggregators_60k.png', 'aggregators.py',
                    finished([f'winsorized/n{n:g}_c{c}' for n in AGGREGATOR_NOISES for c in CS] +
                             [f'aggregators_60k/n{n:g}_{label}' for n in AGGREGATOR_NOISES
                              for label in CHEAP_AGGREGATORS]),
                    [f'--out={report_dir}/aggregators_60k.png',
                     f'--report={report_dir}/AGGREGATORS_60k.md', *step_time_args]))
  drawn = []
  for figure, script, run_dirs, args in scripts:
    if not run_dirs:
      continue
    subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', script),
                    '--runs=' + ','.join(run_dirs), *args], check=True, stdout=subprocess.DEVNULL)
    drawn.append(figure)
    if script == 'figures_2_3.py':
      drawn.append(figure.replace('figure2', 'figure3'))
  return drawn


def _learning_checks(check, scalars, examples, run, learning, suffix):
  """§2.3's checks (label_noise_checks)."""
  every = [run(n) for n in NOISES]
  numbered = learning == '2.3'
  check((f'{learning} (1)' if numbered else learning,
         f'time to a given training accuracy grows with noise{suffix}',
         'first step with train acc >= 90%'), every,
        lambda: claims.time_to_accuracy_grows_with_noise(
            {n: scalars(run(n))['train/accuracy'] for n in NOISES}))
  for n in (0.25, 0.5, 0.75):
    check((f'{learning} (2)' if numbered else learning,
           f'pristine examples are learned faster than corrupt ({n:.0%}){suffix}',
           'median step from which examples stay fitted'), [run(n)],
          lambda n=n: claims.pristine_learned_first(examples(run(n))['learned_since_step'],
                                                    examples(run(n))['first_learned_step'],
                                                    examples(run(n))['corrupt']))
  if numbered:
    check(('2.3 (3)', 'with fewer pristine examples they are learned more slowly',
           'pristine accuracy, steps 1-10, 0% vs 25%'), [run(0.0), run(0.25)],
          lambda: claims.fewer_pristine_learned_slower(
              scalars(run(0.0))['train_pristine/accuracy'],
              scalars(run(0.25))['train_pristine/accuracy']))
  check((learning, f'all variants fit their training set{suffix}', 'final train acc >= 99%'),
        every, lambda: claims.all_fit({n: float(scalars(run(n))['train/accuracy'].iloc[-1])
                                       for n in NOISES}))
  for n in (0.5, 0.75, 1.0):
    check((learning, f'early stopping beats the final test accuracy ({n:.0%}){suffix}',
           'best vs final test acc'), [run(n)],
          lambda n=n: claims.early_stopping_helps(scalars(run(n))['test/accuracy']))


def label_noise_checks(check, scalars, examples, decomposition_record, run, section, suffix=''):
  """The §2.3 and §2.4 checks on one family of label-noise runs.

  Args:
    check: check(key, run names, measure) records measure() under key, or NOT
      RUN if a run is unfinished.
    scalars, examples, decomposition_record: run name -> that file's contents.
    run: noise -> run name, e.g. 'label_noise/noise0.5'.
    section: (the §2.3 label, the §2.4 label), e.g. ('2.3', '2.4') or ('4', '4').
    suffix: added to every claim, e.g. ' (GD)'.
  """
  from cg_tf import decomposition  # pylint: disable=g-import-not-at-top
  learning, strong = section
  if learning is not None:
    _learning_checks(check, scalars, examples, run, learning, suffix)
  if strong is None:
    return
  for n in (0.25, 0.5):

    def fractions(n=n):
      record = decomposition_record(run(n))
      return record['step'], decomposition.fractions(record['inner'])

    check((strong, f'f^p starts above f^c and crosses ({n:.0%}){suffix}', 'exact f^p, f^c'),
          [run(n)], lambda f=fractions: claims.pristine_dominates_then_crosses(f()[0], f()[1][:, 0]))
    check((strong, f'no crossing in null worlds ({n:.0%}){suffix}', 'exact f^p, f^c'), [run(n)],
          lambda f=fractions: claims.nulls_do_not_cross(f()[1][:, 1:]))


def winsorized_checks(check, scalars, cell, suffix=''):
  """§3.3's checks on one grid of winsorized runs; cell(noise, c) names a run."""

  def final(n, c, tag):
    return float(scalars(cell(n, c))[tag].dropna().iloc[-1])

  for n in (0.25, 0.5, 0.75, 1.0):
    for c in (2, 4, 8):
      check(('3.3', f'c = {c} keeps training accuracy at most proper ({n:.0%}){suffix}',
             'final train acc <= proper + 0.02'), [cell(n, c)],
            lambda n=n, c=c: claims.winsorized_stays_at_proper(
                final(n, c, 'train/accuracy'), claims.proper_accuracy(n),
                final_test_accuracy=final(n, c, 'test/accuracy')))
    check(('3.3', f'overfit grows more slowly as c grows ({n:.0%}){suffix}',
           'final overfit, c = 0..8'), [cell(n, c) for c in CS],
          lambda n=n: claims.overfit_falls_with_c({c: final(n, c, 'overfit') for c in CS}))


def checks_for_seed(out, tag, experiments, scale):
  """{(section, claim, quantity): Verdict} for the runs of one seed at `scale`.

  A check whose runs are not all finished is NOT RUN, naming what it waits for.
  """
  runs = os.path.join(out, 'runs')
  results = {}

  def path(name):
    return os.path.join(runs, name + tag)

  @functools.lru_cache(maxsize=None)
  def scalars(name):
    return workdir.read_scalars(path(name))

  @functools.lru_cache(maxsize=None)
  def examples(name):
    return workdir.read_examples(path(name))

  @functools.lru_cache(maxsize=None)
  def decomposition_record(name):
    record = workdir.read_measurements(path(name), workdir.DECOMPOSITION_FILE)
    if record is None:
      raise UserInputError(f'{path(name)} has no {workdir.DECOMPOSITION_FILE}; rerun it with '
                           'its flagfile, which sets --decomp_every')
    return record

  def checker(into):
    def check(key, names, measure):
      missing = [name + tag for name in names if not workdir.is_finished(path(name))]
      into[key] = claims.not_run(missing) if missing else measure()
    return check

  check = checker(results)

  if {'label_noise', 'decomposition'} & set(experiments):
    label_noise_checks(check, scalars, examples, decomposition_record,
                       lambda n: f'label_noise/noise{n:g}',
                       ('2.3' if 'label_noise' in experiments else None,
                        '2.4' if 'decomposition' in experiments else None))
  if 'winsorized' in experiments:
    winsorized_checks(check, scalars, lambda n, c: f'winsorized/n{n:g}_c{c}')
  if 'cnn' in experiments:
    label_noise_checks(check, scalars, examples, decomposition_record,
                       lambda n: f'cnn/n{n:g}_c0', ('2.3', '2.4'))
    if scale == 'full':
      # §2.3's two checks that 60,000 steps cannot decide at 50-100% noise, again on
      # Figure 1 given the steps to fit.
      fit_run = cnn_fit_runs()
      longer = ', trained for 200,000 steps at 50-100% noise'

      def fit_curves():
        return {n: scalars(run)['train/accuracy'] for n, run in fit_run.items()}

      longer_rows = {}
      check_longer = checker(longer_rows)
      check_longer(('2.3 (1)', f'time to a given training accuracy grows with noise{longer}',
                    'first step with train acc >= 90%'), list(fit_run.values()),
                   lambda: claims.time_to_accuracy_grows_with_noise(fit_curves()))
      check_longer(('2.3', f'all variants fit their training set{longer}',
                    'final train acc >= 99%'),
                   list(fit_run.values()), lambda: claims.all_fit_in_time(fit_curves()))
      # Each row right after the 60,000-step row it decides again.
      after = {(key[0], key[1][:-len(longer)]): key for key in longer_rows}
      rows = list(results.items())
      results.clear()
      for key, verdict in rows:
        results[key] = verdict
        if key[:2] in after:
          results[after[key[:2]]] = longer_rows[after[key[:2]]]
      assert len(results) == len(rows) + len(longer_rows), 'a 200,000-step row lost its place'
    winsorized_checks(check, scalars, lambda n, c: f'cnn/n{n:g}_c{c}')
  if 'full_batch' in experiments:
    by_method = []
    for method, name in (('gd', 'full-batch GD'), ('sgd', 'SGD')):
      by_method.append({})
      label_noise_checks(checker(by_method[-1]), scalars, examples, decomposition_record,
                         lambda n, method=method: f'full_batch/{method}_noise{n:g}', ('4', '4'),
                         f' ({name})')
    # Each claim's GD row beside its SGD row.
    for gd, sgd in zip(*(list(rows.items()) for rows in by_method)):
      results.update([gd, sgd])
  return results


def machine():
  """The machine in words: OS, processor, cores."""
  return f'{platform.system()} {platform.machine()}, {os.cpu_count()} cores'


def report_name(experiments, scale):
  """REPORT.md (mini) or REPORT_full.md; for the CNN's experiment alone, REPORT_cnn.md (full)
  or REPORT_cnn_mini.md."""
  if list(experiments) == ['cnn']:
    return 'REPORT_cnn.md' if scale == 'full' else 'REPORT_cnn_mini.md'
  return 'REPORT_full.md' if scale == 'full' else 'REPORT.md'


def write_report(out, seeds, experiments, scale, report_dir, figures, finished, total,
                 compare_with=None, compare_name='compared report'):
  """Writes REPORT.md (mini) or REPORT_full.md (full) into `report_dir` and returns its text.

  Each row's verdict combines the seeds by claims.over_seeds: a claim passes
  only if every finished seed passes it. The header counts the rows' verdicts
  by outcome (claims.count).

  Args:
    figures: file names in `report_dir` to show below the table.
    finished, total: how many of the runs are finished, of how many.
    compare_with: another report's text (e.g. the mini one); its measurement
      and verdict of each claim are shown beside this one's.
    compare_name: what to call that report in the column headers.
  """
  per_seed = [checks_for_seed(out, seed_suffix(s), experiments, scale) for s in range(seeds)]
  other = claims.read_markdown(compare_with) if compare_with else None
  rows, verdicts = [], []
  for key in per_seed[0]:
    verdict = claims.over_seeds([results[key] for results in per_seed])
    verdicts.append(verdict)
    row = {'section': key[0], 'claim': key[1], 'test': key[2], 'measured': verdict.measured,
           'verdict': verdict.text}
    if other is not None:
      theirs = other.get(key[:2], {})
      row['other_measured'] = theirs.get('measured', 'not checked')
      row['other_verdict'] = theirs.get('verdict', '')
    rows.append(row)
  columns = claims.COLUMNS
  if other is not None:
    columns = (*columns[:3], ('measured', f'measured ({scale})'), ('verdict', f'verdict ({scale})'),
               ('other_measured', f'measured ({compare_name})'),
               ('other_verdict', f'verdict ({compare_name})'))
  name = report_name(experiments, scale)
  seed_rule = (f' Over {seeds} seeds a claim passes only if every seed whose runs finished '
               'passes it; the measurement shown is the first finished seed\'s.'
               if seeds > 1 else '')
  network = ', on the CNN' if 'cnn' in experiments else ''
  text = (f'# Coherent Gradients: claims checked ({scale} scale{network})\n\n'
          f'{claims.count(verdicts)}. {finished} of {total} runs are finished.{seed_rule} '
          'NOT SHOWN means the runs finished but their numbers cannot decide the claim (the '
          'reason says what was seen). Written by analysis/reproduce.py from the run '
          f'directories under {out}/runs on {machine()}.\n\n'
          f'{claims.as_markdown(rows, columns)}\n\n' +
          ''.join(f'![{f}]({f})\n\n' for f in figures))
  with open(os.path.join(report_dir, name), 'w') as f:
    f.write(text)
  return text


def main(argv):
  del argv
  start = time.time()
  if FLAGS.data_dir and not os.path.isdir(FLAGS.data_dir):
    cli.fail(f'--data_dir={FLAGS.data_dir} is not a directory; point it at the MNIST IDX files')
  try:
    os.makedirs(FLAGS.out, exist_ok=True)
  except OSError as e:
    cli.fail(f'--out={FLAGS.out} cannot be created ({e.strerror}); choose another --out')
  report_dir = FLAGS.report_dir or FLAGS.out
  try:
    os.makedirs(report_dir, exist_ok=True)
  except OSError as e:
    cli.fail(f'--report_dir={report_dir} cannot be created ({e.strerror}); choose another')
  compare_with = None
  if FLAGS.compare_with:
    try:
      with open(FLAGS.compare_with) as f:
        compare_with = f.read()
    except OSError as e:
      cli.fail(f'--compare_with={FLAGS.compare_with} cannot be read ({e.strerror}); give a '
               'REPORT.md that reproduce.py wrote, e.g. docs/REPORT.md')
  if FLAGS.devices and FLAGS.parallel not in (1, len(FLAGS.devices)):
    cli.fail(f'--parallel={FLAGS.parallel} but --devices lists {len(FLAGS.devices)}: each run '
         'gets its own device, so leave --parallel out')
  specs = run_specs(FLAGS.scale, FLAGS.seeds, FLAGS.experiments)
  chosen = selected(specs, FLAGS.only)
  if not chosen:
    cli.fail(f'--only={",".join(FLAGS.only)} matches none of the {len(specs)} runs; run names '
         'look like label_noise/noise0.5, winsorized/n0.5_c4 or coherence/noise1')
  if FLAGS.shard:
    k, n = map(int, FLAGS.shard.split('/'))
    chosen = shard(chosen, k, n)
  if FLAGS.list:
    try:
      for name, args in chosen:  # flagfile paths are relative to the repository
        print(f'cd {ROOT} && ' + ' '.join(command(name, args, FLAGS.out, FLAGS.data_dir)))
      sys.stdout.flush()
    except BrokenPipeError:  # e.g. | head: the reader has what it wanted
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return
  ran, failed = 0, []
  if not FLAGS.report_only:
    ran, failed = run_all(chosen, FLAGS.out, FLAGS.data_dir, FLAGS.parallel, FLAGS.devices)
  if failed:
    print(f'reproduce.py: error: {len(failed)} runs failed ({", ".join(failed)}); see '
          f'{FLAGS.out}/logs/ and rerun to resume', file=sys.stderr)
    sys.exit(1)
  if not FLAGS.report_only and any(name.startswith('aggregators') for name, _ in chosen):
    measure_step_times(FLAGS.out, FLAGS.data_dir)
  missing = unfinished(specs, FLAGS.out)
  if missing:
    print(f'{len(missing)} of {len(specs)} runs are not finished yet: the figures and tables '
          'leave them out' + (', and the report marks the checks that need them NOT RUN'
                              if set(FLAGS.experiments) & set(PAPER_EXPERIMENTS) else ''))
  figures = draw_figures(FLAGS.out, FLAGS.seeds, FLAGS.experiments, report_dir, FLAGS.scale)
  if 'coherence' in FLAGS.experiments:
    print(f'coherence findings: {report_dir}/{coherence_names(FLAGS.scale)[1]}')
  if 'cnn' in FLAGS.experiments:
    print(f'coherence findings on the CNN: {report_dir}/{coherence_names(FLAGS.scale, "cnn")[1]}')
  if 'aggregators' in FLAGS.experiments:
    print(f'aggregator comparison: {report_dir}/{aggregators_names(FLAGS.scale)[1]}')
  if 'aggregators_60k' in FLAGS.experiments:
    print(f'aggregator comparison on every example: {report_dir}/AGGREGATORS_60k.md')
  if set(FLAGS.experiments) & {*PAPER_EXPERIMENTS, 'cnn'}:
    print(write_report(FLAGS.out, FLAGS.seeds, FLAGS.experiments, FLAGS.scale, report_dir,
                       [f for f in figures if f.startswith(('figure', 'full_batch', 'coherence_'))],
                       len(specs) - len(missing),
                       len(specs), compare_with, FLAGS.compare_with))
  print(f'{ran} runs trained, figures and report drawn in {(time.time() - start) / 60:.1f} min')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
