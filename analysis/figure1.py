"""Figure 1 of the paper from label-noise run directories.

  python analysis/figure1.py --runs=runs/noise0,runs/noise25,runs/noise50,runs/noise75,runs/noise100 \
      --out=figures/figure1.png

Draws (a) training accuracy, (b) test accuracy, (c) training loss and (d) the
fraction of pristine (solid) and corrupt (dashed) examples first learned by
each step, one colour per noise level, into OUT and OUT with .pdf. Runs of one
noise level with different seeds are drawn as their mean and min-max band.
Prints a markdown table of the numbers that §2.3's claims rest on, from the
mean over seeds.
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
from cg_tf import learning  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import workdir  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """This script's flags, defined when it runs, so that other modules can import it."""
  flags.DEFINE_list('runs', None, 'Run directories: one per noise level and seed.')
  cli.define_output('out', 'figure1.png', 'Output PNG; a PDF is written beside it.')


def load_runs(run_dirs):
  """[(noise, [scalars DataFrame per seed], [examples dict per seed])] sorted by noise."""
  by_noise = {}
  for run_dir in run_dirs:
    scalars, examples = by_noise.setdefault(workdir.read_config(run_dir).noise, ([], []))
    scalars.append(workdir.read_scalars(run_dir))
    examples.append(workdir.read_examples(run_dir))
  return [(noise, *by_noise[noise]) for noise in sorted(by_noise)]


def fraction_learned_by(first_learned_step, steps):
  """For each of `steps`, the fraction of examples first learned at or before it."""
  learned = first_learned_step[first_learned_step >= 0]
  return np.array([(learned <= s).sum() for s in steps]) / max(len(first_learned_step), 1)


def plot_curves(ax, runs, tag, ylabel, colors):
  for (noise, seeds, _), color in zip(runs, colors):
    plotting.plot_mean_band(ax, [scalars[tag] for scalars in seeds], color=color,
                            label=f'{noise:.0%} noise')
  ax.set_xscale('symlog', linthresh=1)
  ax.set_xlabel('training step')
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)


def learned_curve(scalars, examples, corrupt):
  """Fraction of the corrupt (or pristine) examples first learned by each logged step."""
  steps = scalars.index.to_numpy()
  chosen = examples['corrupt'] == corrupt
  return pd.Series(fraction_learned_by(examples['first_learned_step'][chosen], steps), index=steps)


def plot_learned(ax, runs, colors):
  for (noise, seeds, examples), color in zip(runs, colors):
    for corrupt, linestyle, name in ((False, '-', 'pristine'), (True, '--', 'corrupt')):
      if any((e['corrupt'] == corrupt).any() for e in examples):
        plotting.plot_mean_band(ax, [learned_curve(s, e, corrupt) for s, e in zip(seeds, examples)],
                                color=color, linestyle=linestyle, label=f'{noise:.0%} {name}')
  ax.set_xscale('symlog', linthresh=1)
  ax.set_xlabel('training step')
  ax.set_ylabel('fraction learned')
  ax.grid(alpha=0.3)


def draw(runs, out):
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(runs)))
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
  plot_curves(axes[0], runs, 'train/accuracy', 'training accuracy', colors)
  plot_curves(axes[1], runs, 'test/accuracy', 'test accuracy', colors)
  plot_curves(axes[2], runs, 'train/loss', 'training loss', colors)
  plot_learned(axes[3], runs, colors)
  for ax, title in zip(axes, ['(a) Training accuracy', '(b) Test accuracy', '(c) Training loss',
                              '(d) First step an example is learned']):
    ax.set_title(title)
  axes[0].legend(loc='lower right')
  axes[3].legend(loc='upper left', fontsize=7)
  plotting.save(fig, out, dpi=120)


def _format(row, tag):
  value = row.get(tag, np.nan)
  return '-' if np.isnan(value) else f'{value:.3f}'


def median_steps(examples, key):
  """'pristine P / corrupt C': each group's median of the per-example `key` record
  (first_learned_step or learned_since_step), pooled over the seeds' `examples`."""
  steps, corrupt = (np.concatenate([e[name] for e in examples]) for name in (key, 'corrupt'))
  return ' / '.join(claims.step_word(learning.median_step(steps[chosen])) if chosen.any() else '-'
                    for chosen in (~corrupt, corrupt))


def summary_table(runs):
  """Markdown rows: the numbers behind §2.3's claims, one row per noise level (seed mean;
  the per-example medians pool the seeds' examples)."""
  rows = ['| noise | seeds | step to 90% train acc | final train acc | pristine acc / corrupt acc '
          'at step 900 | best test acc (step) | final test acc | median first-learned step, '
          'pristine / corrupt | median learned-since step, pristine / corrupt |',
          '|---|---|---|---|---|---|---|---|---|']
  for noise, seeds, examples in runs:
    scalars = plotting.mean_over_seeds(seeds)
    at = scalars.loc[scalars.index[scalars.index <= 900][-1]]
    split = f'{_format(at, "train_pristine/accuracy")} / {_format(at, "train_corrupt/accuracy")}'
    test = scalars['test/accuracy']
    to_90 = claims.first_step_reaching(scalars['train/accuracy'], 0.9)
    rows.append(f'| {noise:.0%} | {len(seeds)} | {to_90} | '
                f'{scalars["train/accuracy"].iloc[-1]:.4f} | {split} | '
                f'{test.max():.4f} ({int(test.idxmax())}) | {test.iloc[-1]:.4f} | '
                f'{median_steps(examples, "first_learned_step")} | '
                f'{median_steps(examples, "learned_since_step")} |')
  return '\n'.join(rows)


def main(argv):
  del argv
  run_dirs = cli.run_directories(FLAGS.runs)
  runs = load_runs(run_dirs)
  draw(runs, FLAGS.out)
  print(summary_table(runs))
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
