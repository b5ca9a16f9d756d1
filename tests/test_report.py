"""The claims report from finished runs with planted numbers: every row's exact verdict and measurement.

The runs are written by the writers the training loop uses (tests/fixtures.py),
once planted to pass every check and once to fail it, so each row of the
report is computed here with a known answer.
"""

import os

from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf

from analysis import claims
from analysis import reproduce
from cg_tf.config import Config
from tests import fixtures

STEPS = 1000
LOGGED = (*range(11), 100, 200, 300, 400, 500, 900, STEPS)
EXPERIMENTS = ('label_noise', 'decomposition', 'winsorized')
NUM_EXAMPLES = 20
CORRUPT = np.arange(NUM_EXAMPLES) < 8
DECOMPOSITION_STEPS = np.arange(6)

# What each plan plants: the numbers behind every check.
PASSING = {
    'reach': {0.0: 10, 0.25: 100, 0.5: 200, 0.75: 300, 1.0: 400},  # first step at 90% train acc
    'final_train': {0.0: 1.0, 0.25: 1.0, 0.5: 0.995, 0.75: 1.0, 1.0: 0.99},
    'pristine_first_steps': {0.0: 0.8, 0.25: 0.6},  # pristine accuracy at steps 1-10
    'learned': (2, 500),  # first-learned step of (pristine, corrupt) examples
    'learned_since': (20, 5000),  # and the step from which they stay fitted, which decides
    'test': (0.9, 0.7),  # (best at step 100, final) test accuracy
    'f_actual': [0.9, 0.8, 0.6, 0.4, 0.3, 0.3],  # crosses at step 3
    'f_nulls': [[0.7] * 6] * 3,
    'winsorized_train': {2: 0.015, 4: -0.1, 8: -0.2},  # final train acc - proper
    'winsorized_test': 0.8,
    'overfit': {0: 0.5, 1: 0.4, 2: 0.3, 4: 0.2, 8: 0.1},
}
FAILING = {
    'reach': {0.0: 400, 0.25: 300, 0.5: 200, 0.75: 100, 1.0: 10},
    'final_train': {0.0: 1.0, 0.25: 1.0, 0.5: 1.0, 0.75: 1.0, 1.0: 0.9},
    'pristine_first_steps': {0.0: 0.6, 0.25: 0.8},
    'learned': (2, 500),  # the first-learned step favours pristine; learned-since does not
    'learned_since': (5000, 20),
    'test': (0.8, 0.9),
    'f_actual': [0.7] * 6,
    'f_nulls': [[0.7] * 6, [0.9, 0.8, 0.6, 0.4, 0.3, 0.3], [0.7] * 6],
    'winsorized_train': {2: 0.05, 4: 0.3, 8: 0.021},
    'winsorized_test': 0.8,
    'overfit': {0: 0.5, 1: 0.4, 2: 0.3, 4: 0.35, 8: 0.1},
}


def plant(out, plan, tag=''):
  """Writes the label-noise and winsorized runs of one seed of the full-scale report."""
  plant_label_noise(out, plan, lambda noise: f'label_noise/noise{noise:g}{tag}')
  plant_winsorized(out, plan, tag)


def plant_label_noise(out, plan, name, **settings):
  """Writes Figure 1's five runs, run `noise` into runs/<name(noise)>, with Config `settings`."""
  for noise in reproduce.NOISES:
    reach, final = plan['reach'][noise], plan['final_train'][noise]
    scalars = {
        'train/accuracy': {s: final if s == STEPS else 0.95 if s >= reach else 0.5
                           for s in LOGGED},
        'test/accuracy': {s: 0.5 if s < 100 else plan['test'][0] if s == 100 else plan['test'][1]
                          for s in LOGGED},
        'train/loss': {s: 2.0 - s / STEPS for s in LOGGED},
        'train_pristine/accuracy': {s: plan['pristine_first_steps'].get(noise, 0.5)
                                    for s in LOGGED},
    }
    corrupt = CORRUPT if noise > 0 else np.zeros(NUM_EXAMPLES, bool)
    first = np.where(corrupt, plan['learned'][1], plan['learned'][0])
    since = np.where(corrupt, plan['learned_since'][1], plan['learned_since'][0])
    decomposition = None
    if noise in reproduce.DECOMPOSITION_NOISES:
      decomposition = fixtures.decomposition_record(
          DECOMPOSITION_STEPS, np.stack([plan['f_actual'], *plan['f_nulls']], axis=1), corrupt,
          sampled_offset=0.05)
    fixtures.write_run(fixtures.run_path(out, name(noise)),
                       Config(noise=noise, steps=STEPS, **settings), scalars,
                       fixtures.examples_record(corrupt, first, since), decomposition)


def plant_winsorized(out, plan, tag=''):
  """Writes Figure 4's 25 runs."""
  for noise in reproduce.NOISES:
    proper = claims.proper_accuracy(noise)
    for c in reproduce.CS:
      train_accuracy = proper + plan['winsorized_train'].get(c, 0.3)
      test_accuracy = plan['winsorized_test']
      if noise == 0.25 and c == 8:
        test_accuracy = 0.11  # a network that learned nothing
      scalars = {'train/accuracy': {0: 0.1, STEPS: train_accuracy},
                 'test/accuracy': {0: 0.1, 100: 0.85, STEPS: test_accuracy},
                 'overfit': {0: 0.0, STEPS: plan['overfit'][c]},
                 'train_corrupt/accuracy': {0: 0.1, STEPS: 0.25}}
      fixtures.write_run(fixtures.run_path(out, f'winsorized/n{noise:g}_c{c}{tag}'),
                         Config(noise=noise, winsor_c=c, hidden=(256, 256, 256), steps=STEPS),
                         scalars)


def report_table(out, seeds=1, experiments=EXPERIMENTS):
  """The rows of the report on OUT as [section, claim, quantity, measured, verdict], and its
  header line."""
  report_dir = os.path.join(out, 'docs')
  os.makedirs(report_dir, exist_ok=True)
  text = reproduce.write_report(out, seeds, experiments, 'full', report_dir, [], 0, 0)
  rows = [[cell.strip() for cell in line.strip('|').split('|')] for line in text.splitlines()
          if line.startswith('| ')]
  return [row for row in rows if row[0] != '§'], text.splitlines()[2]


def report_rows(out, seeds=1):
  """{claim: (measured, verdict)} of the report on OUT, and its header line."""
  rows, header = report_table(out, seeds)
  return {row[1]: (row[3], row[4]) for row in rows}, header


EXPECTED_PASS = {
    'time to a given training accuracy grows with noise':
        ('step to 90% train acc: 0%: 10, 25%: 100, 50%: 200, 75%: 300, 100%: 400', 'PASS'),
    'pristine examples are learned faster than corrupt (25%)':
        ('median learned-since step: pristine 20, corrupt 5000 (first learned: 2, 500)', 'PASS'),
    'with fewer pristine examples they are learned more slowly':
        ('mean pristine accuracy over steps 1-10: 0.800 clean vs 0.600 noisy', 'PASS'),
    'all variants fit their training set':
        ('final train acc 0%: 1.0000, 25%: 1.0000, 50%: 0.9950, 75%: 1.0000, 100%: 0.9900', 'PASS'),
    'early stopping beats the final test accuracy (75%)':
        ('best test acc 0.900 (step 100) vs final 0.700', 'PASS'),
    'f^p starts above f^c and crosses (50%)':
        ('f^p(0) = 0.900, f^c(0) = 0.100; crossing at step 3', 'PASS'),
    'no crossing in null worlds (25%)': ('0 of 3 null worlds start with f^p > f^c and cross', 'PASS'),
    'c = 2 keeps training accuracy at most proper (50%)':
        ('final train acc 0.565 vs proper 0.550', 'PASS'),
    'c = 8 keeps training accuracy at most proper (25%)':
        ('final train acc 0.575 vs proper 0.775, final test acc 0.110',
         'PASS (trivially: the network learned nothing)'),
    'c = 4 keeps training accuracy at most proper (100%)':
        ('final train acc 0.000 vs proper 0.100', 'PASS'),
    'overfit grows more slowly as c grows (75%)':
        ('final overfit c=0: 0.5000, c=1: 0.4000, c=2: 0.3000, c=4: 0.2000, c=8: 0.1000', 'PASS'),
}
EXPECTED_FAIL = {
    'time to a given training accuracy grows with noise':
        ('step to 90% train acc: 0%: 400, 25%: 300, 50%: 200, 75%: 100, 100%: 10', 'FAIL'),
    'pristine examples are learned faster than corrupt (75%)':
        ('median learned-since step: pristine 5000, corrupt 20 (first learned: 2, 500)', 'FAIL'),
    'with fewer pristine examples they are learned more slowly':
        ('mean pristine accuracy over steps 1-10: 0.600 clean vs 0.800 noisy', 'FAIL'),
    'all variants fit their training set':
        ('final train acc 0%: 1.0000, 25%: 1.0000, 50%: 1.0000, 75%: 1.0000, 100%: 0.9000', 'FAIL'),
    'early stopping beats the final test accuracy (50%)':
        ('best test acc 0.900 (step 200) vs final 0.900', 'FAIL'),
    'f^p starts above f^c and crosses (25%)':
        ('f^p(0) = 0.700, f^c(0) = 0.300; crossing never', 'FAIL'),
    'no crossing in null worlds (50%)': ('1 of 3 null worlds start with f^p > f^c and cross', 'FAIL'),
    'c = 2 keeps training accuracy at most proper (100%)':
        ('final train acc 0.150 vs proper 0.100', 'FAIL'),
    'c = 8 keeps training accuracy at most proper (75%)':
        ('final train acc 0.346 vs proper 0.325', 'FAIL'),
    'overfit grows more slowly as c grows (25%)':
        ('final overfit c=0: 0.5000, c=1: 0.4000, c=2: 0.3000, c=4: 0.3500, c=8: 0.1000', 'FAIL'),
}


class ReportTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = os.path.join(os.environ.get('TEST_TMPDIR', '/tmp'), f'cg_tf_report_{os.getpid()}')
    cls.passing = os.path.join(cls.root, 'passing')
    cls.failing = os.path.join(cls.root, 'failing')
    cls.seeds = os.path.join(cls.root, 'seeds')
    plant(cls.passing, PASSING)
    plant(cls.failing, FAILING)
    plant(cls.seeds, PASSING)
    # Seed 1 fails one check that seed 0 passes.
    plant(cls.seeds, dict(PASSING, reach=FAILING['reach']), tag='_s1')

  def test_every_row_passes_on_runs_planted_to_pass(self):
    rows, header = report_rows(self.passing)
    self.assertLen(rows, 29)
    for claim, expected in EXPECTED_PASS.items():
      self.assertEqual(rows[claim], expected, claim)
    self.assertEqual({verdict for _, verdict in rows.values()},
                     {'PASS', 'PASS (trivially: the network learned nothing)'})
    self.assertStartsWith(header, '28 pass, 1 pass trivially, 0 fail, 0 not shown, of 29 checks.')

  def test_every_row_fails_on_runs_planted_to_fail(self):
    rows, header = report_rows(self.failing)
    for claim, expected in EXPECTED_FAIL.items():
      self.assertEqual(rows[claim], expected, claim)
    self.assertEqual({verdict for _, verdict in rows.values()}, {'FAIL'})
    self.assertStartsWith(header, '0 pass, 0 pass trivially, 29 fail, 0 not shown, of 29 checks.')

  def test_a_claim_passes_only_if_every_seed_does(self):
    rows, header = report_rows(self.seeds, seeds=2)
    self.assertEqual(rows['time to a given training accuracy grows with noise'],
                     ('seed 0: step to 90% train acc: 0%: 10, 25%: 100, 50%: 200, 75%: 300, '
                      '100%: 400', 'FAIL (1/2 seeds pass)'))
    self.assertEqual(rows['c = 8 keeps training accuracy at most proper (50%)'],
                     ('seed 0: final train acc 0.350 vs proper 0.550', 'PASS (2/2 seeds pass)'))
    self.assertEqual(rows['c = 8 keeps training accuracy at most proper (25%)'][1],
                     'PASS (trivially: the network learned nothing; 2/2 seeds pass)')
    self.assertStartsWith(header, '27 pass, 1 pass trivially, 1 fail, 0 not shown, of 29 checks.')
    self.assertIn('a claim passes only if every seed whose runs finished passes it', header)

  def test_a_seed_not_finished_counts_for_nothing(self):
    out = os.path.join(self.root, 'two_seeds_one_run')
    plant(out, PASSING)
    rows, _ = report_rows(out, seeds=2)
    self.assertEqual(rows['no crossing in null worlds (50%)'],
                     ('0 of 3 null worlds start with f^p > f^c and cross',
                      'PASS (1/1 seeds pass; 1 not run)'))

  def test_degenerate_evidence_is_not_shown(self):
    out = os.path.join(self.root, 'degenerate')
    flat = dict(PASSING, reach={n: 10_000 for n in reproduce.NOISES},
                final_train={n: 0.5 for n in reproduce.NOISES},
                overfit={c: 0.0 for c in reproduce.CS}, f_nulls=[])
    plant(out, flat)
    rows, header = report_rows(out)
    self.assertEqual(rows['time to a given training accuracy grows with noise'],
                     ('step to 90% train acc: 0%: never, 25%: never, 50%: never, 75%: never, '
                      '100%: never', 'NOT SHOWN (no run reached 90%)'))
    self.assertEqual(rows['overfit grows more slowly as c grows (50%)'][1],
                     'NOT SHOWN (tied: c=0 and c=1, c=1 and c=2, c=2 and c=4, c=4 and c=8)')
    self.assertEqual(rows['no crossing in null worlds (25%)'],
                     ('0 of 0 null worlds start with f^p > f^c and cross',
                      'NOT SHOWN (no null worlds were measured (--null_worlds=0))'))
    self.assertIn(' 7 not shown, of 29 checks.', header)

  @pytest.mark.slow
  def test_figure1_table(self):
    runs = ','.join(fixtures.run_path(self.passing, f'label_noise/noise{n:g}')
                    for n in reproduce.NOISES)
    table = fixtures.run_script('figure1.py', f'--runs={runs}', f'--out={self.root}/figures/f1.png')
    row = next(line for line in table.splitlines() if line.startswith('| 75% |'))
    # noise, seeds, step to 90%, final train, pristine / corrupt at step 900, best test (step),
    # final test, median first-learned and learned-since steps (pristine / corrupt)
    self.assertEqual(row, '| 75% | 1 | 300 | 1.0000 | 0.500 / - | 0.9000 (100) | 0.7000 | '
                     '2 / 500 | 20 / 5000 |')

  @pytest.mark.slow
  def test_figure4_table(self):
    table = fixtures.run_script('figure4.py', f'--runs={self.passing}/runs/winsorized/n0.5_c*',
                       f'--out={self.root}/figures/f4.png')
    row = next(line for line in table.splitlines() if line.startswith('| 4 | 50% |'))
    # c, noise, seeds, proper, final train, final test, best test, final overfit, corrupt fitted
    self.assertEqual(row, '| 4 | 50% | 1 | 0.550 | 0.450 | 0.800 | 0.850 | 0.200 | 0.250 |')

  @pytest.mark.slow
  def test_figures_2_3_table(self):
    table = fixtures.run_script('figures_2_3.py',
                       f'--runs={fixtures.run_path(self.passing, "label_noise/noise0.5")}',
                       f'--out_dir={self.root}/figures')
    rows = [line for line in table.splitlines() if line.startswith('| 50% |')]
    # noise, seeds, world, f^p at 0, crossing step, step from which f^c leads, f^p and |g|^2
    # between the two (none: it leads from the crossing), mean |sampled - exact|, seconds
    self.assertEqual(rows[0], '| 50% | 1 | actual | 0.900 | 3 | 3 | - | - | 0.050 | 0.50 |')
    self.assertEqual(rows[1], '| 50% | 1 | null 1 | 0.700 | None | None | - | - | 0.050 | 0.50 |')


class FullBatchReportTest(tf.test.TestCase):
  """§4's rows: Figure 1's claims for full-batch GD, each beside the same claim for SGD."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.out = os.path.join(os.environ.get('TEST_TMPDIR', '/tmp'), f'cg_tf_report_gd_{os.getpid()}')
    plant_label_noise(cls.out, PASSING, lambda noise: f'full_batch/gd_noise{noise:g}',
                      batch_size=0)
    # Minibatches of 10 of the 20 examples: two steps an epoch.
    plant_label_noise(cls.out, FAILING, lambda noise: f'full_batch/sgd_noise{noise:g}',
                      batch_size=10)

  def test_each_gd_row_beside_its_sgd_row_with_its_own_verdict(self):
    rows, header = report_table(self.out, experiments=('full_batch',))
    gd_rows, sgd_rows = rows[0::2], rows[1::2]
    self.assertLen(gd_rows, 12)  # §2.3's and §2.4's claims but the one on fewer pristine examples
    self.assertLen(sgd_rows, 12)
    self.assertEqual({row[0] for row in rows}, {'4'})
    for gd, sgd in zip(gd_rows, sgd_rows):
      self.assertEndsWith(gd[1], ' (full-batch GD)')
      self.assertEqual(sgd[1], gd[1].replace(' (full-batch GD)', ' (SGD)'))
      self.assertEqual(gd[4], 'PASS', gd)
      self.assertEqual(sgd[4], 'FAIL', sgd)
    gd = {row[1]: row[3] for row in gd_rows}
    self.assertEqual(gd['f^p starts above f^c and crosses (50%) (full-batch GD)'],
                     'f^p(0) = 0.900, f^c(0) = 0.100; crossing at step 3')
    self.assertEqual({row[1]: row[3] for row in sgd_rows}[
        'time to a given training accuracy grows with noise (SGD)'],
        'step to 90% train acc: 0%: 400, 25%: 300, 50%: 200, 75%: 100, 100%: 10')
    self.assertStartsWith(header, '12 pass, 0 pass trivially, 12 fail, 0 not shown, of 24 checks.')

  @pytest.mark.slow
  def test_full_batch_table(self):
    runs = ','.join(fixtures.run_path(self.out, f'full_batch/{method}_noise{n:g}')
                    for n in reproduce.NOISES for method in ('gd', 'sgd'))
    table = fixtures.run_script('full_batch.py', f'--runs={runs}',
                                f'--out={self.out}/figures/full_batch.png')
    rows = [line for line in table.splitlines() if line.startswith('| 75% |')]
    # noise, optimizer, seeds, step to 90% train acc, ... in epochs, final train acc,
    # best test acc (epoch), final test acc
    self.assertEqual(rows, [
        '| 75% | full-batch GD | 1 | 300 | 300 | 1.0000 | 0.9000 (100) | 0.7000 |',
        '| 75% | SGD | 1 | 100 | 50 | 1.0000 | 0.9000 (100) | 0.9000 |'])
