"""Figures 2 and 3 of the paper (§2.4) from runs made with --decomp_every.

  python analysis/figures_2_3.py --runs=runs/d25,runs/d50,runs/d75 --out_dir=figures

Figure 2: f^p and f^c over training, one column per noise level, the actual
designation in the first row and the null worlds below; solid lines are exact
over the whole population, dotted ones the paper's sampled estimator.
Figure 3: i^p and i^c, the mean cumulative contribution of one pristine or
corrupt example, over the first 10 steps. Prints a markdown table: where f^p
and f^c cross in each world, and how far the sampled estimate is from the
exact value.
"""

import os
import sys

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from analysis import plotting  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import decomposition  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import workdir  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_list('runs', None, 'Run directories made with --decomp_every > 0.')
flags.DEFINE_string('out_dir', 'figures', 'Where figure2.png/.pdf and figure3.png/.pdf go.')
flags.DEFINE_integer('first_steps', 10, 'Steps shown in Figure 3.')
FLAGS = flags.FLAGS


def load(run_dirs):
  """[(noise, decomposition record)] sorted by noise."""
  runs = []
  for run_dir in run_dirs:
    record = workdir.read_decomposition(run_dir)
    if record is None:
      raise app.UsageError(f'{run_dir} has no decomposition.npz; run it with --decomp_every')
    runs.append((workdir.read_config(run_dir).noise, record))
  return sorted(runs, key=lambda run: run[0])


def crossing_step(steps, f):
  """First step at which f^p < f^c (f: [T, 2]); None if never."""
  below = np.nonzero(f[:, 0] < f[:, 1])[0]
  return None if below.size == 0 else int(steps[below[0]])


def leading_consecutive(steps):
  """How many of `steps` are 0, 1, 2, ... before the first gap: where i^p is defined."""
  count = 0
  while count < len(steps) and steps[count] == count:
    count += 1
  return count


def world_name(world):
  return 'actual' if world == 0 else f'null {world}'


def figure2(runs, out):
  worlds = runs[0][1]['inner'].shape[1]
  fig, axes = plt.subplots(worlds, len(runs), figsize=(4.5 * len(runs), 2.3 * worlds),
                           sharex=True, sharey=True, squeeze=False)
  for j, (noise, record) in enumerate(runs):
    steps = record['step']
    exact, sampled = (decomposition.fractions(record[k]) for k in ('inner', 'sampled_inner'))
    for world in range(worlds):
      ax = axes[world][j]
      for group, color, name in ((0, 'tab:blue', 'f^p'), (1, 'tab:red', 'f^c')):
        ax.plot(steps, exact[:, world, group], color=color, label=f'${name}$')
        ax.plot(steps, sampled[:, world, group], color=color, linestyle=':', alpha=0.7,
                label=f'${name}$ sampled')
      ax.set_xscale('symlog', linthresh=1)
      ax.grid(alpha=0.3)
  _finish(fig, axes, runs, out)


def figure3(runs, out, first_steps):
  worlds = runs[0][1]['inner'].shape[1]
  fig, axes = plt.subplots(worlds, len(runs), figsize=(4.5 * len(runs), 2.3 * worlds),
                           sharex=True, squeeze=False)
  for j, (noise, record) in enumerate(runs):
    steps = record['step']
    shown = min(leading_consecutive(steps), first_steps + 1)
    cumulative = decomposition.cumulative_means(record['inner'][:shown], record['corrupt'])
    for world in range(worlds):
      ax = axes[world][j]
      ax.plot(steps[:shown], cumulative[:, world, 0], color='tab:blue', label='$i^p$')
      ax.plot(steps[:shown], cumulative[:, world, 1], color='tab:red', label='$i^c$')
      ax.grid(alpha=0.3)
  _finish(fig, axes, runs, out)


def _finish(fig, axes, runs, out):
  plotting.label_grid(axes, [f'{noise:.0%} label noise' for noise, _ in runs],
                      [world_name(world) for world in range(len(axes))])
  axes[0][0].legend(fontsize=7)
  plotting.save(fig, out)


def summary_table(runs):
  rows = ['| noise | world | f^p at step 0 | f^p - f^c crosses at step | '
          'mean abs(sampled - exact) f^p | measurement s/step (mean) |', '|---|---|---|---|---|---|']
  for noise, record in runs:
    exact, sampled = (decomposition.fractions(record[k]) for k in ('inner', 'sampled_inner'))
    for world in range(exact.shape[1]):
      rows.append(f'| {noise:.0%} | {world_name(world)} | {exact[0, world, 0]:.3f} | '
                  f'{crossing_step(record["step"], exact[:, world])} | '
                  f'{np.abs(sampled[:, world, 0] - exact[:, world, 0]).mean():.3f} | '
                  f'{record["seconds"].mean():.2f} |')
  return '\n'.join(rows)


def main(argv):
  del argv
  if not FLAGS.runs:
    raise app.UsageError('--runs is required')
  runs = load(FLAGS.runs)
  figure2(runs, os.path.join(FLAGS.out_dir, 'figure2.png'))
  figure3(runs, os.path.join(FLAGS.out_dir, 'figure3.png'), FLAGS.first_steps)
  print(summary_table(runs))
  print(f'wrote {FLAGS.out_dir}/figure2.png and figure3.png')


if __name__ == '__main__':
  app.run(main)
