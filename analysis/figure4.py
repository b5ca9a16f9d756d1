"""Figure 4 of the paper from winsorized-SGD run directories.

  python analysis/figure4.py --runs='runs/winsorized/*' --out=figures/figure4.png

Finds each run's noise level and c in its config.json and draws the grid: rows
c, columns noise; in each cell training accuracy (ta), test accuracy (va) and
overfit = ta - [noise * 0.1 + (1 - noise) * va] (§3.3), plus the proper
accuracy (dotted). Runs of one cell with different seeds are drawn as their
mean and min-max band. Prints a markdown table of the final values (seed mean).
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
from analysis import claims  # pylint: disable=g-import-not-at-top,wrong-import-position
from analysis import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from analysis import plotting  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import workdir  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """This script's flags, defined when it runs, so that other modules can import it."""
  flags.DEFINE_list('runs', None, 'Run directories or glob patterns.')
  cli.define_output('out', 'figure4.png', 'Output PNG; a PDF is written beside it.')


def load_grid(run_dirs):
  """{(c, noise): [scalars DataFrame per seed]} of the run directories."""
  grid = {}
  for run_dir in run_dirs:
    config = workdir.read_config(run_dir)
    grid.setdefault((config.winsor_c, config.noise), []).append(workdir.read_scalars(run_dir))
  return grid


def plot_cell(ax, seeds, noise):
  for tag, label, color in (('train/accuracy', 'ta', 'tab:blue'),
                            ('test/accuracy', 'va', 'tab:orange'),
                            ('overfit', 'overfit', 'tab:red')):
    plotting.plot_mean_band(ax, [scalars[tag] for scalars in seeds], label=label, color=color)
  ax.axhline(claims.proper_accuracy(noise), color='gray', linestyle=':', linewidth=1)
  ax.set_ylim(-0.05, 1.05)
  ax.grid(alpha=0.3)


def draw(grid, out):
  cs = sorted({c for c, _ in grid})
  noises = sorted({n for _, n in grid})
  fig, axes = plt.subplots(len(cs), len(noises), figsize=(3.2 * len(noises), 2.4 * len(cs)),
                           sharex=True, sharey=True, squeeze=False)
  for i, c in enumerate(cs):
    for j, noise in enumerate(noises):
      ax = axes[i][j]
      if (c, noise) in grid:
        plot_cell(ax, grid[(c, noise)], noise)
      else:
        ax.text(0.5, 0.5, 'not run', ha='center', transform=ax.transAxes)
  plotting.label_grid(axes, [f'{n:.0%} label noise' for n in noises], [f'c = {c:g}' for c in cs])
  axes[0][0].legend(loc='lower right', fontsize=7)
  plotting.save(fig, out)


def summary_table(grid):
  """Markdown rows of final values, one per cell (seed mean); '-' where a cell has no corrupt labels."""
  rows = ['| c | noise | seeds | proper acc | final train acc | final test acc | best test acc | '
          'final overfit | corrupt labels fitted |', '|---|---|---|---|---|---|---|---|---|']
  for (c, noise), seeds in sorted(grid.items()):
    scalars = plotting.mean_over_seeds(seeds)
    last = scalars.iloc[-1]
    corrupt_fit = last.get('train_corrupt/accuracy', np.nan)
    rows.append(f'| {c:g} | {noise:.0%} | {len(seeds)} | {claims.proper_accuracy(noise):.3f} | '
                f'{last["train/accuracy"]:.3f} | {last["test/accuracy"]:.3f} | '
                f'{scalars["test/accuracy"].max():.3f} | {last["overfit"]:.3f} | '
                f'{"-" if np.isnan(corrupt_fit) else f"{corrupt_fit:.3f}"} |')
  return '\n'.join(rows)


def main(argv):
  del argv
  run_dirs = cli.run_directories(FLAGS.runs)
  grid = load_grid(run_dirs)
  draw(grid, FLAGS.out)
  print(summary_table(grid))
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
