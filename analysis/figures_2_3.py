"""Figures 2 and 3 of the paper (§2.4) from runs made with --decomp_every.

  python analysis/figures_2_3.py --runs=runs/d25,runs/d50,runs/d75 --out_dir=figures

Figure 2: f^p and f^c over training, one column per noise level, the actual
designation in the first row and the null worlds below; solid lines are exact
over the whole population, dotted ones the paper's sampled estimator.
Figure 3: i^p and i^c, the mean cumulative contribution of one pristine or
corrupt example, over the first 10 steps. Runs of one noise level with
different seeds are drawn as their mean and min-max band. Prints a markdown
table: where the seed-mean f^p and f^c cross in each world, and how far the
sampled estimate is from the exact value.
"""

import os
import sys

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pandas as pd  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from analysis import claims  # pylint: disable=g-import-not-at-top,wrong-import-position
from analysis import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from analysis import plotting  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import workdir  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """This script's flags, defined when it runs, so that other modules can import it."""
  flags.DEFINE_list('runs', None, 'Run directories made with --decomp_every > 0.')
  cli.define_output('out_dir', 'figures', 'Where figure2.png/.pdf and figure3.png/.pdf go.',
                    directory=True)
  flags.DEFINE_string('suffix', '', 'Appended to the file names: figure2SUFFIX.png, ...')
  flags.DEFINE_integer('first_steps', 10, 'Steps shown in Figure 3.')


def _decomposition():
  """cg_tf.decomposition, imported on first use: it loads TensorFlow, which a bad --runs
  should not wait for."""
  from cg_tf import decomposition  # pylint: disable=g-import-not-at-top
  return decomposition


def load(run_dirs):
  """[(noise, [decomposition record per seed])] sorted by noise."""
  by_noise = {}
  for run_dir in run_dirs:
    record = workdir.read_measurements(run_dir, workdir.DECOMPOSITION_FILE)
    if record is None:
      cli.fail(f'--runs: {run_dir} has no decomposition.npz; run it with --decomp_every')
    by_noise.setdefault(workdir.read_config(run_dir).noise, []).append(record)
  return [(noise, by_noise[noise]) for noise in sorted(by_noise)]


def per_seed(records, values):
  """[pandas Series by step] of `values(record)` for each seed's record."""
  return [pd.Series(values(record), index=record['step']) for record in records]


def step_at(steps, index):
  """steps[index] as an int; None if index is None (the event never happened)."""
  return None if index is None else int(steps[index])


def leads_from(f):
  """Index of the first measurement from which f^p < f^c at every later one (f: [T, 2]);
  None if f^p is not below f^c at the last."""
  above = np.nonzero(~(f[:, 0] < f[:, 1]))[0]
  if above.size == 0:
    return 0
  return None if above[-1] == len(f) - 1 else int(above[-1]) + 1


def between(values, start, stop):
  """'min–max' of values[start:stop] (the measurements from the crossing until f^c leads
  for good), '-' if there are none."""
  if start is None or stop is None or stop <= start:
    return '-'
  window = values[start:stop]
  return f'{window.min():.3g}–{window.max():.3g}'


def leading_consecutive(steps):
  """How many of `steps` are 0, 1, 2, ... before the first gap: where i^p is defined."""
  count = 0
  while count < len(steps) and steps[count] == count:
    count += 1
  return count


def world_name(world):
  return 'actual' if world == 0 else f'null {world}'


def figure2(runs, out):
  worlds = runs[0][1][0]['inner'].shape[1]
  fig, axes = plt.subplots(worlds, len(runs), figsize=(4.5 * len(runs), 2.3 * worlds),
                           sharex=True, sharey=True, squeeze=False)
  for j, (_, records) in enumerate(runs):
    for world in range(worlds):
      ax = axes[world][j]
      for group, color, name in ((0, 'tab:blue', 'f^p'), (1, 'tab:red', 'f^c')):
        for key, style in (('inner', {}), ('sampled_inner', {'linestyle': ':', 'alpha': 0.7})):
          plotting.plot_mean_band(
              ax, per_seed(records, lambda r, k=key: _decomposition().fractions(r[k])[:, world, group]),
              color=color, label=f'${name}$' + (' sampled' if style else ''), **style)
      ax.set_xscale('symlog', linthresh=1)
      ax.grid(alpha=0.3)
  _finish(fig, axes, runs, out)


def first_steps_cumulative(record, first_steps):
  """A record cut to its leading dense steps, up to first_steps, with i^p and i^c added."""
  shown = min(leading_consecutive(record['step']), first_steps + 1)
  return {'step': record['step'][:shown],
          'cumulative': _decomposition().cumulative_means(record['inner'][:shown], record['corrupt'])}


def figure3(runs, out, first_steps):
  worlds = runs[0][1][0]['inner'].shape[1]
  fig, axes = plt.subplots(worlds, len(runs), figsize=(4.5 * len(runs), 2.3 * worlds),
                           sharex=True, squeeze=False)
  for j, (_, records) in enumerate(runs):
    cut = [first_steps_cumulative(record, first_steps) for record in records]
    for world in range(worlds):
      ax = axes[world][j]
      for group, color, name in ((0, 'tab:blue', 'i^p'), (1, 'tab:red', 'i^c')):
        plotting.plot_mean_band(ax, per_seed(cut, lambda r: r['cumulative'][:, world, group]),
                                color=color, label=f'${name}$')
      ax.grid(alpha=0.3)
  _finish(fig, axes, runs, out)


def _finish(fig, axes, runs, out):
  plotting.label_grid(axes, [f'{noise:.0%} label noise' for noise, _ in runs],
                      [world_name(world) for world in range(len(axes))])
  axes[0][0].legend(fontsize=7)
  plotting.save(fig, out)


def summary_table(runs):
  """Markdown rows, one per noise level and world, from the mean over seeds.

  Besides the first crossing: the step from which f^c stays above f^p, and between the
  two the range of f^p and of the whole-set gradient's squared norm |g|^2 = <g, g^p> +
  <g, g^c> (the same in every world), which say whether f^p swings because |g| is small.
  """
  rows = ['| noise | seeds | world | f^p at step 0 | f^p - f^c crosses at step | '
          'f^c leads from step | f^p between | \\|g\\|^2 between | '
          'mean abs(sampled - exact) f^p | measurement s/step (mean) |',
          '|---|---|---|---|---|---|---|---|---|---|']
  for noise, records in runs:
    steps = records[0]['step']
    exact, sampled = (np.mean([_decomposition().fractions(r[k]) for r in records], axis=0)
                      for k in ('inner', 'sampled_inner'))
    squared_norm = np.mean([r['inner'][:, 0].sum(axis=-1) for r in records], axis=0)
    seconds = np.mean([r['seconds'].mean() for r in records])
    for world in range(exact.shape[1]):
      crossing = claims.crosses(exact[:, world, 0], exact[:, world, 1])
      leads = leads_from(exact[:, world])
      rows.append(f'| {noise:.0%} | {len(records)} | {world_name(world)} | '
                  f'{exact[0, world, 0]:.3f} | {step_at(steps, crossing)} | '
                  f'{step_at(steps, leads)} | '
                  f'{between(exact[:, world, 0], crossing, leads)} | '
                  f'{between(squared_norm, crossing, leads)} | '
                  f'{np.abs(sampled[:, world, 0] - exact[:, world, 0]).mean():.3f} | '
                  f'{seconds:.2f} |')
  return '\n'.join(rows)


def main(argv):
  del argv
  run_dirs = cli.run_directories(FLAGS.runs)
  runs = load(run_dirs)
  figure2(runs, os.path.join(FLAGS.out_dir, f'figure2{FLAGS.suffix}.png'))
  figure3(runs, os.path.join(FLAGS.out_dir, f'figure3{FLAGS.suffix}.png'), FLAGS.first_steps)
  print(summary_table(runs))
  print(f'wrote {FLAGS.out_dir}/figure2{FLAGS.suffix}.png and figure3{FLAGS.suffix}.png')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
