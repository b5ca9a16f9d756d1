"""The aggregator comparison: memorisation and generalisation of each update rule.

  python analysis/reproduce.py --experiments=aggregators --out=results/aggregators
  python analysis/aggregators.py --runs='results/aggregators/runs/aggregators/*' \
      --step_times=results/aggregators/step_times.csv \
      --out=docs/aggregators.png --report=docs/aggregators_table.md

For every run (one aggregator and setting at one noise level) prints a
markdown row: final and best test accuracy, final training accuracy against
the proper accuracy (1 - noise + noise / 10), the share of corrupt labels
fitted, the final overfit (§3.3), for dp the (epsilon, delta) spent, and,
with --step_times, the time of one step divided by plain SGD's.
Draws, one panel per noise level, final training and test accuracy of each
run beside the proper accuracy. Seeds of one run are averaged.

The step times come from `analysis/bench_step.py --csv`, which times the
training steps side by side in one process: the runs' own step rates depend
on what else the machine ran beside them.
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
from cg_tf import aggregators  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import workdir  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """This script's flags, defined when it runs, so that other modules can import it."""
  flags.DEFINE_list('runs', None, 'Run directories, e.g. results/aggregators/runs/aggregators/*.')
  cli.define_output('out', 'aggregators.png', 'Output PNG; a PDF is written beside it.')
  cli.define_output('report', None, 'Also write the table to this markdown file.')
  flags.DEFINE_string('step_times', None, 'CSV of step times from analysis/bench_step.py --csv: '
                      'adds a "step ÷ SGD" column for the runs whose model and setting it timed.')


def read_step_times(path):
  """{(hidden, batch size, setting): step time ÷ SGD's} from a bench_step.py --csv file."""
  try:
    table = pd.read_csv(path, dtype={'hidden': str})
  except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
    cli.fail(f'--step_times={path} cannot be read ({e}); write it with '
             'analysis/bench_step.py --csv')
  missing = {'hidden', 'batch_size', 'setting', 'ratio_to_sgd'} - set(table.columns)
  if missing:
    cli.fail(f'--step_times={path} lacks the columns {", ".join(sorted(missing))}; write it '
             'with analysis/bench_step.py --csv')
  return {(r.hidden, int(r.batch_size), r.setting): float(r.ratio_to_sgd)
          for r in table.itertuples()}


# Table and figure order: the registry's (plain SGD, the per-coordinate rules, then
# clipping and DP).
ORDER = tuple(aggregators.REGISTRY)


def order(config):
  """Sort key of a run's aggregator and setting."""
  rule = 'mean' if config.aggregator == 'winsorize' and config.winsor_c == 0 else config.aggregator
  return (ORDER.index(rule), config.winsor_c, config.trim_k, config.clip_norm,
          config.noise_multiplier, -config.learning_rate)


def row(run_dir, step_times):
  config = workdir.read_config(run_dir)
  cost_key = (','.join(map(str, config.hidden)), config.batch_size,
              aggregators.step_cost_setting(config))
  scalars = workdir.read_scalars(run_dir)
  examples = workdir.read_examples(run_dir)
  test = scalars['test/accuracy'].dropna()
  corrupt = examples['corrupt']
  final = scalars.ffill().iloc[-1]
  return {'noise': config.noise, 'aggregator': aggregators.describe_run(config),
          'order': order(config),
          'final test': test.iloc[-1], 'best test': test.max(),
          'final train': final['train/accuracy'], 'proper': claims.proper_accuracy(config.noise),
          'corrupt fitted': final['train_corrupt/accuracy'] if corrupt.any() else np.nan,
          'final overfit': final['overfit'],
          'epsilon': final['dp/epsilon'] if 'dp/epsilon' in scalars else np.nan,
          'delta': config.dp_delta if config.aggregator == 'dp' else np.nan,
          'step ÷ SGD': step_times.get(cost_key, np.nan)}


def as_markdown(table):
  lines = ['| noise | aggregator | final test | best test | final train | proper | corrupt '
           'fitted | final overfit | (ε, δ) | step ÷ SGD |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for _, r in table.iterrows():
    privacy = '–' if np.isnan(r['epsilon']) else f'({r["epsilon"]:.3g}, {r["delta"]:g})'
    fitted = '–' if np.isnan(r['corrupt fitted']) else f'{r["corrupt fitted"]:.3f}'
    cost = '–' if np.isnan(r['step ÷ SGD']) else f'{r["step ÷ SGD"]:.1f}'
    lines.append(f'| {r["noise"]:.0%} | {r["aggregator"]} | {r["final test"]:.3f} | '
                 f'{r["best test"]:.3f} | {r["final train"]:.3f} | {r["proper"]:.3f} | '
                 f'{fitted} | {r["final overfit"]:.3f} | {privacy} | {cost} |')
  return '\n'.join(lines) + '\n'


def draw(table, out):
  """One panel per noise level; a setting's step time ÷ SGD, when known, is in its label."""
  noises = sorted(table['noise'].unique())
  order = list(dict.fromkeys(table['aggregator']))
  cost = table.groupby('aggregator', sort=False)['step ÷ SGD'].first()
  labels = [name if np.isnan(cost[name]) else f'{name} ({cost[name]:.1f}× SGD)' for name in order]
  fig, axes = plt.subplots(1, len(noises), figsize=(4.2 * len(noises), 0.3 * len(order) + 1.6),
                           sharey=True, squeeze=False)
  for ax, noise in zip(axes[0], noises):
    part = table[table['noise'] == noise].set_index('aggregator').reindex(order)
    y = np.arange(len(order))
    ax.barh(y - 0.2, part['final train'], height=0.4, label='final train acc', color='tab:red')
    ax.barh(y + 0.2, part['final test'], height=0.4, label='final test acc', color='tab:blue')
    ax.axvline(claims.proper_accuracy(noise), color='black', linestyle='--', linewidth=1,
               label='proper train acc')
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_title(f'{noise:.0%} noise')
    ax.grid(axis='x', alpha=0.3)
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=3, fontsize='small')
  plotting.save(fig, out, rect=(0, 0.05, 1, 1))


def main(argv):
  del argv
  step_times = read_step_times(FLAGS.step_times) if FLAGS.step_times else {}
  rows = [row(run_dir, step_times) for run_dir in cli.run_directories(FLAGS.runs)]
  rows.sort(key=lambda r: (r['noise'], r['order']))
  table = (pd.DataFrame(rows).drop(columns='order')
           .groupby(['noise', 'aggregator'], sort=False).mean().reset_index())
  draw(table, FLAGS.out)
  text = as_markdown(table)
  cli.print_report(text, FLAGS.report)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
