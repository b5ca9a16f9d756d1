"""What runs logged, as tables: a tag's range and extremes over steps, or every value.

  python analysis/scalars.py --runs='results/cnn/runs/cnn/long_n*' \
      --tags=train/accuracy,test/accuracy --from_step=80000
  python analysis/scalars.py --runs=results/cnn/runs/cnn/n0.25_c4_s1 \
      --tags='train/accuracy,dead_units/*' --series

For each run and each tag (a name, or a shell pattern such as 'dead_units/*'),
one markdown row over the evaluated steps from --from_step to --to_step (both
included): how many there are, the first and the last value, and the
smallest and the largest with the step of each. With --series, one table per
run instead, of every value of the tags in that range, one row per step.

Reads the run directories' event files, of finished runs (committed ones
included) and of runs still training, as TensorBoard does; so every
trajectory, plateau and range the docs quote has a command that prints it.
"""

import fnmatch
import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from analysis import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf import workdir  # pylint: disable=g-import-not-at-top,wrong-import-position
from cg_tf.errors import UserInputError  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """This script's flags, defined when it runs, so that other modules can import it."""
  flags.DEFINE_list('runs', None, 'Run directories or glob patterns.')
  flags.DEFINE_list('tags', ['train/accuracy', 'test/accuracy'],
                    'Tags or shell patterns of tags, e.g. train/accuracy,dead_units/*.')
  flags.DEFINE_integer('from_step', 0, 'First step of the range.', lower_bound=0)
  flags.DEFINE_integer('to_step', None, 'Last step of the range; default: the last logged.',
                       lower_bound=0)
  flags.DEFINE_bool('series', False, 'Print every value in the range instead of its summary.')
  cli.define_output('report', None, 'Also write the tables to this markdown file.')


def matching_tags(columns, patterns):
  """The columns that match any of `patterns` (names or shell patterns), in the patterns' order."""
  tags = []
  for pattern in patterns:
    tags.extend(c for c in columns if fnmatch.fnmatchcase(c, pattern) and c not in tags)
  return tags


def unmatched(patterns, columns_of_runs):
  """The patterns that match no column of any run: a mistyped tag, not a run that lacks it."""
  return [p for p in patterns
          if not any(fnmatch.filter(columns, p) for columns in columns_of_runs)]


def in_range(values, from_step, to_step):
  """The rows of `values` (a Series or DataFrame indexed by step) from from_step to to_step.

  Both ends are included; to_step None is the last logged step.
  """
  last = values.index.max() if to_step is None else to_step
  return values[(values.index >= from_step) & (values.index <= last)]


def range_summary(series):
  """(count, first, last, smallest, its step, largest, its step) of a series indexed by step.

  Steps at which the tag was not logged (NaN) are left out. The extremes'
  steps are the first at which each extreme is reached. A series with no
  values gives (0, nan, nan, nan, None, nan, None).
  """
  series = series.dropna()
  if series.empty:
    return 0, np.nan, np.nan, np.nan, None, np.nan, None
  values, steps = series.to_numpy(), series.index.to_numpy()
  low, high = int(np.argmin(values)), int(np.argmax(values))
  return (len(values), values[0], values[-1], values[low], int(steps[low]), values[high],
          int(steps[high]))


def _value(x):
  return '-' if np.isnan(x) else f'{x:.4f}'


def summary_rows(run_dir, scalars, patterns, from_step, to_step):
  """Markdown rows, one per tag, of range_summary over [from_step, to_step]."""
  rows = []
  for tag in matching_tags(scalars.columns, patterns):
    count, first, last, low, low_step, high, high_step = range_summary(
        in_range(scalars[tag], from_step, to_step))
    rows.append(f'| {run_dir} | {tag} | {count} | {_value(first)} | {_value(last)} | '
                f'{_value(low)} (step {low_step}) | {_value(high)} (step {high_step}) |')
  return rows


def series_table(run_dir, scalars, patterns, from_step, to_step):
  """A markdown table of every value of the tags in [from_step, to_step], one row per step."""
  tags = matching_tags(scalars.columns, patterns)
  frame = in_range(scalars[tags], from_step, to_step).dropna(how='all')
  lines = [f'{run_dir}', '', '| step | ' + ' | '.join(tags) + ' |',
           '|---|' + '---|' * len(tags)]
  for step, row in frame.iterrows():
    lines.append(f'| {step} | ' + ' | '.join(_value(v) for v in row) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  if FLAGS.to_step is not None and FLAGS.to_step < FLAGS.from_step:
    cli.fail(f'--to_step={FLAGS.to_step} is before --from_step={FLAGS.from_step}; '
             'give a range that goes forward')
  if not FLAGS.tags:
    cli.fail('--tags is empty: name at least one tag, e.g. --tags=train/accuracy')
  tables, rows, columns_of_runs = [], [], []
  for run_dir in cli.run_directories(FLAGS.runs, problem=lambda run_dir: None):
    try:
      scalars = workdir.read_scalars(run_dir)
    except UserInputError as e:
      cli.fail(f'{run_dir}: {e}')
    columns_of_runs.append(list(scalars.columns))
    if FLAGS.series:
      tables.append(series_table(run_dir, scalars, FLAGS.tags, FLAGS.from_step, FLAGS.to_step))
    else:
      rows.extend(summary_rows(run_dir, scalars, FLAGS.tags, FLAGS.from_step, FLAGS.to_step))
  missing = unmatched(FLAGS.tags, columns_of_runs)
  if missing:
    logged = sorted(set().union(*columns_of_runs))
    cli.fail(f'no run logs a tag matching {", ".join(missing)}; they log {", ".join(logged)}')
  if not FLAGS.series:
    tables.append('\n'.join(['| run | tag | evaluations | first | last | min | max |',
                             '|---|---|---|---|---|---|---|', *rows]) + '\n')
  cli.print_report('\n'.join(tables), FLAGS.report)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
