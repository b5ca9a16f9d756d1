"""One command reproduces the paper: every run, every figure, REPORT.md.

  python analysis/reproduce.py --scale=mini --data_dir=../shared/data/mnist --out=repro

`mini` uses the CPU-sized flagfiles (flags/*_cpu.cfg) and `full` the paper's.
Runs go to OUT/runs/, logs to OUT/logs/, and figures and REPORT.md to OUT/.
Finished runs are reused, interrupted ones resume from their checkpoints, and
`--parallel` runs several at once. `--seeds=N` repeats every run with
seed = noise_seed = 0..N-1; the report counts the seeds that agree with each
claim, and the figures draw the mean over seeds with a min-max band.

§2.4's decomposition only observes training (it changes no numbers), so the
label-noise runs at 25, 50 and 75% noise record it as they go: Figures 1, 2
and 3 come from the same 5 runs per seed.
"""

import concurrent.futures
import fnmatch
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

flags.DEFINE_enum('scale', 'mini', ['mini', 'full'], 'mini: 2 CPU cores; full: the paper.')
flags.DEFINE_string('out', 'repro', 'Output directory.')
flags.DEFINE_string('data_dir', None, 'MNIST IDX directory (else tfds).')
flags.DEFINE_integer('seeds', 1, 'Seeds per run.', lower_bound=1)
flags.DEFINE_integer('parallel', 1, 'Runs at once.', lower_bound=1)
PAPER_EXPERIMENTS = ('label_noise', 'decomposition', 'winsorized')
# Not in the paper, so not run by default: coherence measured directly
# (docs/coherence.md) and the aggregator comparison (docs/aggregators.md).
EXPERIMENTS = (*PAPER_EXPERIMENTS, 'coherence', 'aggregators')
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
flags.register_validator('shard', lambda v: v is None or bool(re.fullmatch(r'[1-9]\d*/[1-9]\d*', v))
                         and int(v.split('/')[0]) <= int(v.split('/')[1]),
                         'must be K/N with 1 <= K <= N, e.g. 2/3')
flags.register_validator('devices', lambda v: all(d.isdigit() for d in v),
                         'must be GPU indices, e.g. 0,1,2,3')
flags.register_validator('experiments', lambda names: set(names) <= set(EXPERIMENTS),
                         f'must name some of {", ".join(EXPERIMENTS)}')
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISES = (0.0, 0.25, 0.5, 0.75, 1.0)
DECOMPOSITION_NOISES = (0.25, 0.5, 0.75)
CS = (0, 1, 2, 4, 8)
AGGREGATOR_NOISES = (0.0, 0.5, 1.0)
# Every aggregator over a small grid of its own setting, fixed in advance.
AGGREGATOR_GRID = (
    ('mean', []),
    *((f'winsorize_c{c}', ['--aggregator=winsorize', f'--winsor_c={c}']) for c in (1, 2, 4)),
    *((f'trimmed_mean_k{k}', ['--aggregator=trimmed_mean', f'--trim_k={k}']) for k in (1, 2, 4)),
    ('median', ['--aggregator=median']),
    ('m3', ['--aggregator=m3']), ('rm3', ['--aggregator=rm3']), ('ra3', ['--aggregator=ra3']),
    *((f'l2clip_C{c:g}', ['--aggregator=l2clip', f'--clip_norm={c}']) for c in (1.0, 10.0)),
    *((f'dp_C1_sigma{s:g}', ['--aggregator=dp', '--clip_norm=1', f'--noise_multiplier={s}'])
      for s in (0.5, 1.0)),
)


def label_noise_levels(experiments):
  """The noise levels of the plain-SGD runs that `experiments` need."""
  if 'label_noise' in experiments:
    return NOISES
  return DECOMPOSITION_NOISES if 'decomposition' in experiments else ()


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


def draw_figures(out, seeds, experiments):
  runs = os.path.join(out, 'runs')

  def label_noise_dirs(noises):
    return '--runs=' + ','.join(run_dir for n in noises for run_dir in seed_dirs(
        os.path.join(runs, f'label_noise/noise{n:g}'), seeds))

  scripts = []
  if 'label_noise' in experiments:
    scripts.append(['figure1.py', label_noise_dirs(NOISES), f'--out={out}/figure1.png'])
  if 'decomposition' in experiments:
    scripts.append(['figures_2_3.py', label_noise_dirs(DECOMPOSITION_NOISES), f'--out_dir={out}'])
  if 'winsorized' in experiments:
    scripts.append(['figure4.py', '--runs=' + ','.join(
        run_dir for n in NOISES for c in CS
        for run_dir in seed_dirs(os.path.join(runs, f'winsorized/n{n:g}_c{c}'), seeds)),
                    f'--out={out}/figure4.png'])
  if 'coherence' in experiments:
    scripts.append(['coherence.py', '--runs=' + ','.join(
        run_dir for n in NOISES for run_dir in seed_dirs(os.path.join(runs, f'coherence/noise{n:g}'),
                                                         seeds)),
                    f'--out={out}/coherence.png', f'--report={out}/COHERENCE.md'])
  if 'aggregators' in experiments:
    scripts.append(['aggregators.py', '--runs=' + ','.join(
        run_dir for n in AGGREGATOR_NOISES for label, _ in AGGREGATOR_GRID
        for run_dir in seed_dirs(os.path.join(runs, f'aggregators/n{n:g}_{label}'), seeds)),
                    f'--out={out}/aggregators.png', f'--report={out}/AGGREGATORS.md'])
  for script, *args in scripts:
    subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', script), *args], check=True,
                   stdout=subprocess.DEVNULL)


def checks_for_seed(out, tag, experiments):
  """{(section, claim, quantity): Verdict} for the runs of one seed."""
  # Imported here: it loads TensorFlow, which bad flags should not wait for.
  from cg_tf import decomposition  # pylint: disable=g-import-not-at-top
  runs = os.path.join(out, 'runs')
  results = {}
  if 'label_noise' in experiments:
    scalars = {n: workdir.read_scalars(os.path.join(runs, f'label_noise/noise{n:g}{tag}'))
               for n in NOISES}
    results[('2.3 (1)', 'time to a given training accuracy grows with noise',
             'first step with train acc >= 90%')] = claims.time_to_accuracy_grows_with_noise(
                 {n: s['train/accuracy'] for n, s in scalars.items()})
    for n in (0.25, 0.5, 0.75):
      examples = workdir.read_examples(os.path.join(runs, f'label_noise/noise{n:g}{tag}'))
      results[('2.3 (2)', f'pristine examples are learned faster than corrupt ({n:.0%})',
               'median first-learned step')] = claims.pristine_learned_first(
                   examples['first_learned_step'], examples['corrupt'])
    results[('2.3 (3)', 'with fewer pristine examples they are learned more slowly',
             'pristine accuracy, steps 1-10, 0% vs 25%')] = claims.fewer_pristine_learned_slower(
                 scalars[0.0]['train_pristine/accuracy'], scalars[0.25]['train_pristine/accuracy'])
    results[('2.3', 'all variants fit their training set', 'final train acc >= 99%')] = \
        claims.all_fit({n: float(s['train/accuracy'].iloc[-1]) for n, s in scalars.items()})
    for n in (0.5, 0.75, 1.0):
      results[('2.3', f'early stopping beats the final test accuracy ({n:.0%})',
               'best vs final test acc')] = claims.early_stopping_helps(
                   scalars[n]['test/accuracy'].dropna())
  if 'decomposition' in experiments:
    for n in (0.25, 0.5):
      record = workdir.read_measurements(os.path.join(runs, f'label_noise/noise{n:g}{tag}'),
                                         workdir.DECOMPOSITION_FILE)
      f = decomposition.fractions(record['inner'])
      results[('2.4', f'f^p starts above f^c and crosses ({n:.0%})', 'exact f^p, f^c')] = \
          claims.pristine_dominates_then_crosses(record['step'], f[:, 0])
      results[('2.4', f'no crossing in null worlds ({n:.0%})', 'exact f^p, f^c')] = \
          claims.nulls_do_not_cross(f[:, 1:])
  if 'winsorized' in experiments:
    grid = {(n, c): workdir.read_scalars(os.path.join(runs, f'winsorized/n{n:g}_c{c}{tag}'))
            for n in NOISES for c in CS}
    for n in (0.25, 0.5, 0.75, 1.0):
      for c in (2, 4, 8):
        results[('3.3', f'c = {c} keeps training accuracy at most proper ({n:.0%})',
                 'final train acc <= proper + 0.02')] = claims.winsorized_stays_at_proper(
                     float(grid[(n, c)]['train/accuracy'].iloc[-1]), claims.proper_accuracy(n))
      results[('3.3', f'overfit grows more slowly as c grows ({n:.0%})',
               'final overfit, c = 0..8')] = claims.overfit_falls_with_c(
                   {c: float(grid[(n, c)]['overfit'].iloc[-1]) for c in CS})
  return results


def machine():
  """The machine in words: OS, processor, cores."""
  return f'{platform.system()} {platform.machine()}, {os.cpu_count()} cores'


def write_report(out, seeds, experiments, scale, ran, total, minutes):
  per_seed = [checks_for_seed(out, seed_suffix(s), experiments) for s in range(seeds)]
  rows = []
  for key, verdict in per_seed[0].items():
    agree = sum(results[key].passed for results in per_seed)
    rows.append({'section': key[0], 'claim': key[1], 'test': key[2], 'measured': verdict.measured,
                 'verdict': ('PASS' if verdict.passed else 'FAIL') +
                            (f' ({agree}/{seeds} seeds)' if seeds > 1 else '')})
  figures = [f for f in ('figure1.png', 'figure2.png', 'figure3.png', 'figure4.png')
             if os.path.exists(os.path.join(out, f))]
  text = (f'# Coherent Gradients: claims checked ({scale} scale)\n\n'
          f'{sum(r["verdict"].startswith("PASS") for r in rows)} of {len(rows)} checks pass '
          f'(seed 0{f", {seeds} seeds" if seeds > 1 else ""}). This invocation ran {ran} of '
          f'{total} runs and drew the figures in {minutes:.1f} min on {machine()}.\n\n'
          f'{claims.as_markdown(rows)}\n\n' +
          ''.join(f'![{f}]({f})\n\n' for f in figures))
  with open(os.path.join(out, 'REPORT.md'), 'w') as f:
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
    for name, args in chosen:  # flagfile paths are relative to the repository
      print(f'cd {ROOT} && ' + ' '.join(command(name, args, FLAGS.out, FLAGS.data_dir)))
    return
  ran, failed = run_all(chosen, FLAGS.out, FLAGS.data_dir, FLAGS.parallel, FLAGS.devices)
  if failed:
    print(f'reproduce.py: error: {len(failed)} runs failed ({", ".join(failed)}); see '
          f'{FLAGS.out}/logs/ and rerun to resume', file=sys.stderr)
    sys.exit(1)
  missing = unfinished(specs, FLAGS.out)
  if missing:
    print(f'{len(missing)} of {len(specs)} runs are not finished yet; the figures and '
          'REPORT.md are drawn once they are')
    return
  draw_figures(FLAGS.out, FLAGS.seeds, FLAGS.experiments)
  if 'coherence' in FLAGS.experiments:
    print(f'coherence findings: {FLAGS.out}/COHERENCE.md')
  if 'aggregators' in FLAGS.experiments:
    print(f'aggregator comparison: {FLAGS.out}/AGGREGATORS.md')
  if set(FLAGS.experiments) & set(PAPER_EXPERIMENTS):
      print(write_report(FLAGS.out, FLAGS.seeds, FLAGS.experiments, FLAGS.scale, ran, len(specs),
                       (time.time() - start) / 60))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
