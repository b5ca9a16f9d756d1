"""analysis/scalars.py: ranges and extremes of logged tags, against loops and planted runs."""

import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pandas as pd

from analysis import scalars
from cg_tf import workdir
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loop_summary(steps, values, from_step, to_step):
  """range_summary's answer by a plain loop over (step, value) pairs."""
  kept = [(s, v) for s, v in zip(steps, values)
          if not np.isnan(v) and from_step <= s and (to_step is None or s <= to_step)]
  if not kept:
    return None
  low = high = kept[0]
  for s, v in kept[1:]:
    if v < low[1]:
      low = (s, v)
    if v > high[1]:
      high = (s, v)
  return len(kept), kept[0][1], kept[-1][1], low[1], low[0], high[1], high[0]


class RangeSummaryTest(parameterized.TestCase):

  @parameterized.parameters(0, 1, 2, 3, 4, 5)
  def test_against_a_loop_with_ties_and_gaps(self, seed):
    rng = np.random.default_rng(seed)
    steps = np.sort(rng.choice(1000, size=30, replace=False))
    values = rng.integers(0, 4, size=30).astype(float) / 4  # few values: many ties
    values[rng.random(30) < 0.2] = np.nan  # steps at which this tag was not logged
    from_step = int(rng.integers(0, 500))
    to_step = None if seed % 2 else int(rng.integers(from_step, 1000))
    got = scalars.range_summary(scalars.in_range(pd.Series(values, index=steps), from_step, to_step))
    expected = loop_summary(steps, values, from_step, to_step)
    if expected is None:
      self.assertEqual(got[0], 0)
    else:
      self.assertEqual(got, expected)

  def test_known_answer(self):
    series = pd.Series([0.5, 0.9, 0.1, 0.9, 0.1, 0.3], index=[0, 10, 20, 30, 40, 50])
    # Extremes at their first step: the max 0.9 at 10 (not 30), the min 0.1 at 20 (not 40).
    self.assertEqual(scalars.range_summary(scalars.in_range(series, 10, 40)),
                     (4, 0.9, 0.1, 0.1, 20, 0.9, 10))
    self.assertEqual(scalars.range_summary(scalars.in_range(series, 50, None)),
                     (1, 0.3, 0.3, 0.3, 50, 0.3, 50))
    self.assertEqual(scalars.range_summary(scalars.in_range(series, 11, 19))[0], 0)

  def test_tags_match_names_and_patterns_in_order_once(self):
    columns = ['train/accuracy', 'dead_units/conv_1', 'dead_units/hidden_1', 'test/accuracy']
    self.assertEqual(scalars.matching_tags(columns, ['test/accuracy', 'dead_units/*',
                                                     'dead_units/conv_1', 'loss']),
                     ['test/accuracy', 'dead_units/conv_1', 'dead_units/hidden_1'])

  def test_unmatched_are_the_patterns_no_run_logs(self):
    runs = [['train/accuracy', 'dead_units/hidden_1'], ['train/accuracy', 'test/accuracy']]
    self.assertEqual(scalars.unmatched(['test/accuracy', 'dead_units/*', 'loss', 'x*'], runs),
                     ['loss', 'x*'])
    self.assertEqual(scalars.unmatched(['train/*'], runs), [])


class ScriptTest(absltest.TestCase):
  """The script on a run directory with planted values, as a user runs it."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.run_dir = os.path.join(os.environ.get('TEST_TMPDIR', '/tmp'),
                               f'cg_tf_scalars_{os.getpid()}', 'run')
    cls.train = {0: 0.1, 100: 0.6, 200: 0.95, 300: 0.9, 400: 0.95}
    cls.dead = {0: 0.0, 200: 0.5, 400: 0.25}
    fixtures.write_run(cls.run_dir, fixtures.tiny_config(steps=400),
                       {'train/accuracy': cls.train, 'test/accuracy': {0: 0.1, 400: 0.8},
                        'dead_units/hidden_1': cls.dead})

  def test_the_summary_row_of_a_range(self):
    table = fixtures.run_script('scalars.py', f'--runs={self.run_dir}', '--from_step=150',
                                '--tags=train/accuracy,dead_units/*')
    self.assertIn(f'| {self.run_dir} | train/accuracy | 3 | 0.9500 | 0.9500 | '
                  '0.9000 (step 300) | 0.9500 (step 200) |', table)
    self.assertIn(f'| {self.run_dir} | dead_units/hidden_1 | 2 | 0.5000 | 0.2500 | '
                  '0.2500 (step 400) | 0.5000 (step 200) |', table)
    self.assertNotIn('test/accuracy', table)

  def test_the_series(self):
    table = fixtures.run_script('scalars.py', f'--runs={self.run_dir}', '--series',
                                '--tags=train/accuracy,dead_units/hidden_1', '--to_step=200')
    rows = [line for line in table.splitlines() if line.startswith('| ') and line[2].isdigit()]
    self.assertEqual(rows, ['| 0 | 0.1000 | 0.0000 |', '| 100 | 0.6000 | - |',
                            '| 200 | 0.9500 | 0.5000 |'])

  def test_a_run_still_training_is_read(self):
    live = os.path.join(os.path.dirname(self.run_dir), 'live')
    fixtures.write_run(live, fixtures.tiny_config(steps=400), {'train/accuracy': {0: 0.1, 100: 0.3}})
    os.remove(os.path.join(live, workdir.FINAL_METRICS_FILE))  # as before its last step
    self.assertFalse(workdir.is_finished(live))
    table = fixtures.run_script('scalars.py', f'--runs={live},{self.run_dir}',
                                '--tags=train/accuracy,test/accuracy')
    self.assertNotIn(f'| {live} | test/accuracy', table)  # the other run logs it
    self.assertIn(f'| {self.run_dir} | test/accuracy | 2 |', table)
    self.assertIn(f'| {live} | train/accuracy | 2 | 0.1000 | 0.3000 | 0.1000 (step 0) | '
                  '0.3000 (step 100) |', table)

  def test_bad_input_is_one_line_and_exit_2(self):
    for args, message in (
        (['--tags=train/accuracy,nope/*,loss'], 'no run logs a tag matching nope/*, loss; '
                                                 'they log dead_units/hidden_1, test/accuracy'),
        (['--from_step=300', '--to_step=200'], '--to_step=200 is before --from_step=300'),
        (['--tags='], '--tags is empty')):
      result = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', 'scalars.py'),
                               f'--runs={self.run_dir}', *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
      self.assertEqual(result.returncode, 2, result.stderr[-2000:])
      self.assertEqual(result.stdout, '')
      last = result.stderr.strip().splitlines()[-1]
      self.assertStartsWith(last, 'scalars.py: error: ')
      self.assertIn(message, last)


if __name__ == '__main__':
  absltest.main()
