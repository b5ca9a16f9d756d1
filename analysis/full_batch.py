"""§4 of the paper: Figure 1 with full-batch gradient descent beside SGD on the same examples.

  python analysis/full_batch.py --runs='results/full/runs/full_batch/*' --out=docs/full_batch.png

Reads the GD runs (--batch_size=0) and the SGD runs among --runs and draws
Figure 1's four panels ((a) training accuracy, (b) test accuracy, (c) training
loss, (d) the fraction of pristine (solid) and corrupt (dashed) examples first
learned by each step) in three rows: GD, whose step is an epoch; SGD per step;
SGD per epoch. Prints a markdown table: per noise level and optimizer, when
training accuracy first reaches 90% (steps and epochs), the final training
accuracy, and the best and final test accuracy.
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
from analysis import figure1  # pylint: disable=g-import-not-at-top,wrong-import-position
from analysis import plotting  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import workdir  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """This script's flags, defined when it runs, so that other modules can import it."""
  flags.DEFINE_list('runs', None, 'Run directories: GD (--batch_size=0) and SGD runs, one per '
                    'noise level, seed and optimizer.')
  cli.define_output('out', 'full_batch.png', 'Output PNG; a PDF is written beside it.')


def steps_per_epoch(run_dir) -> int:
  """Training steps per pass over the training set: 1 for GD."""
  config = workdir.read_config(run_dir)
  if config.batch_size == 0:
    return 1
  num_train = len(workdir.read_examples(run_dir)['corrupt'])
  return num_train // config.batch_size


def by_optimizer(run_dirs):
  """{'gd': [...], 'sgd': [...]} run directories."""
  groups = {'gd': [], 'sgd': []}
  for run_dir in run_dirs:
    groups['gd' if workdir.read_config(run_dir).batch_size == 0 else 'sgd'].append(run_dir)
  return groups


def in_epochs(runs, per_epoch):
  """figure1.load_runs' records with steps divided by `per_epoch` (one number per run)."""
  out = []
  for (noise, seeds, examples), divisors in zip(runs, per_epoch):
    scaled = []
    for scalars, divisor in zip(seeds, divisors):
      scalars = scalars.copy()
      scalars.index = scalars.index / divisor
      scaled.append(scalars)
    learned = [{**e, 'first_learned_step': np.where(e['first_learned_step'] >= 0,
                                                    e['first_learned_step'] / d, -1)}
               for e, d in zip(examples, divisors)]
    out.append((noise, scaled, learned))
  return out


def draw(rows, out):
  """rows: [(label, runs, x label)], runs as figure1.load_runs returns them."""
  fig, axes = plt.subplots(len(rows), 4, figsize=(20, 4.2 * len(rows)), squeeze=False)
  for ax_row, (label, runs, xlabel) in zip(axes, rows):
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(runs)))
    figure1.plot_curves(ax_row[0], runs, 'train/accuracy', 'training accuracy', colors)
    figure1.plot_curves(ax_row[1], runs, 'test/accuracy', 'test accuracy', colors)
    figure1.plot_curves(ax_row[2], runs, 'train/loss', 'training loss', colors)
    figure1.plot_learned(ax_row[3], runs, colors)
    for ax, title in zip(ax_row, ['(a) Training accuracy', '(b) Test accuracy',
                                  '(c) Training loss', '(d) First step an example is learned']):
      ax.set_title(f'{label}: {title}')
      ax.set_xlabel(xlabel)
    ax_row[0].legend(loc='lower right')
  plotting.save(fig, out, dpi=100)


def summary_table(gd, sgd, sgd_per_epoch):
  """Markdown rows per noise level: GD beside SGD (seed means)."""
  rows = ['| noise | optimizer | seeds | 90% train acc at step | ... at epoch | final train acc | '
          'best test acc (epoch) | final test acc |', '|---|---|---|---|---|---|---|---|']
  for name, runs, per_epoch in (('full-batch GD', gd, None), ('SGD', sgd, sgd_per_epoch)):
    for i, (noise, seeds, _) in enumerate(runs):
      scalars = plotting.mean_over_seeds(seeds)
      step = claims.first_step_reaching(scalars['train/accuracy'], 0.9)
      divisor = 1 if per_epoch is None else per_epoch[i][0]
      epoch = '-' if step is None else f'{step / divisor:.4g}'
      test = scalars['test/accuracy'].dropna()
      rows.append(f'| {noise:.0%} | {name} | {len(seeds)} | {"never" if step is None else step} | '
                  f'{epoch} | {scalars["train/accuracy"].iloc[-1]:.4f} | '
                  f'{test.max():.4f} ({test.idxmax() / divisor:.4g}) | {test.iloc[-1]:.4f} |')
  return '\n'.join(rows)


def main(argv):
  del argv
  groups = by_optimizer(cli.run_directories(FLAGS.runs))
  if not groups['gd'] or not groups['sgd']:
    cli.fail('--runs needs GD runs (--batch_size=0) and SGD runs; it names '
             f'{len(groups["gd"])} and {len(groups["sgd"])}')
  gd, sgd = figure1.load_runs(groups['gd']), figure1.load_runs(groups['sgd'])
  per_epoch = [[steps_per_epoch(d) for d in groups['sgd']
                if workdir.read_config(d).noise == noise] for noise, _, _ in sgd]
  draw([('full-batch GD', gd, 'epoch (= step)'), ('SGD', sgd, 'training step'),
        ('SGD', in_epochs(sgd, per_epoch), 'epoch')], FLAGS.out)
  print(summary_table(gd, sgd, per_epoch))
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
