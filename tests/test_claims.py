"""Every claim check on synthetic inputs that pass, fail, and cannot decide; the seed rule."""

import numpy as np
import pandas as pd
import tensorflow as tf

from absl.testing import parameterized

from analysis import claims
from cg_tf import data


def curve(values, steps=None):
  return pd.Series(values, index=steps if steps is not None else range(len(values)))


class ClaimsTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(0.0, 0.25, 0.5, 0.75, 1.0)
  def test_proper_accuracy_matches_corrupted_labels(self, noise):
    # Ten equally common classes, as MNIST nearly is: the share of labels that
    # corrupt_labels leaves correct, averaged over seeds, is the proper accuracy.
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 1000))
    unchanged = np.mean([np.mean(data.corrupt_labels(labels, noise, seed) == labels)
                         for seed in range(10)])
    self.assertAllClose(claims.proper_accuracy(noise), unchanged, atol=0.005)

  def test_time_to_accuracy(self):
    fast, slow, never = curve([0.5, 0.95, 1.0]), curve([0.2, 0.5, 0.95]), curve([0.1, 0.2, 0.3])
    verdict = claims.time_to_accuracy_grows_with_noise({0: fast, 0.5: slow, 1: never})
    self.assertEqual((verdict.outcome, verdict.measured),
                     (claims.PASS, 'step to 90% train acc: 0%: 1, 50%: 2, 100%: never'))
    self.assertEqual(claims.time_to_accuracy_grows_with_noise({0: slow, 0.5: fast}).outcome,
                     claims.FAIL)

  @parameterized.named_parameters(
      ('none_reached', {0: [0.1, 0.2], 1: [0.1, 0.3]}, 'no run reached 90%'),
      ('two_never', {0: [0.1, 0.95], 0.5: [0.1, 0.3], 1: [0.2, 0.3]}, 'tied: 50% and 100%'),
      ('same_step', {0: [0.1, 0.95], 0.5: [0.2, 0.92]}, 'tied: 0% and 50%'),
      ('no_runs', {}, 'no runs'))
  def test_time_to_accuracy_not_shown(self, curves, reason):
    verdict = claims.time_to_accuracy_grows_with_noise({n: curve(c) for n, c in curves.items()})
    self.assertEqual(verdict.text, f'NOT SHOWN ({reason})')

  def test_a_wrong_order_fails_even_beside_a_tie(self):
    curves = {0: curve([0.1, 0.1, 0.95]), 0.5: curve([0.1, 0.1, 0.95]), 1: curve([0.1, 0.95, 1])}
    self.assertEqual(claims.time_to_accuracy_grows_with_noise(curves).text, 'FAIL')

  def test_pristine_learned_first(self):
    corrupt = np.array([False, False, True, True])
    first = np.array([1, 2, 50, -1])
    self.assertTrue(claims.pristine_learned_first(np.array([1, 2, 50, -1]), first,
                                                  corrupt).passed)
    self.assertFalse(claims.pristine_learned_first(np.array([50, -1, 1, 2]), first,
                                                   corrupt).passed)

  def test_pristine_learned_first_is_decided_by_the_learned_since_step(self):
    # The corrupt examples hit their label by chance at step 2 and are fitted for good only
    # at 40,000; the pristine ones are first learned at 6 and stay fitted from 100.
    corrupt = np.array([False, False, False, True, True, True])
    first = np.array([6, 6, 6, 2, 2, 2])
    since = np.array([100, 100, 100, 40000, 40000, -1])
    verdict = claims.pristine_learned_first(since, first, corrupt)
    self.assertEqual(verdict.text, 'PASS')
    self.assertEqual(verdict.measured, 'median learned-since step: pristine 100, corrupt 40000 '
                     '(first learned: 6, 2)')
    self.assertFalse(claims.pristine_learned_first(np.array([40000, 40000, -1, 100, 100, 100]),
                                                   first[::-1], corrupt).passed)

  def test_step_word(self):
    self.assertEqual(claims.step_word(float('inf')), 'never')
    self.assertEqual(claims.step_word(35000.0), '35000')

  @parameterized.named_parameters(
      ('tied', [3, 3, 3, 3], [False, False, True, True], 'tied'),
      ('not_fitted_at_the_end', [-1, -1, -1, 9], [False, False, True, True],
       'most examples of both groups are not fitted at the end'),
      ('no_corrupt', [1, 2], [False, False], 'needs both pristine and corrupt examples'),
      ('all_corrupt', [1, 2], [True, True], 'needs both pristine and corrupt examples'))
  def test_pristine_learned_first_not_shown(self, since, corrupt, reason):
    verdict = claims.pristine_learned_first(np.array(since), np.zeros(len(since)),
                                            np.array(corrupt))
    self.assertEqual(verdict.text, f'NOT SHOWN ({reason})')

  def test_fewer_pristine_learned_slower(self):
    fast, slow = curve(np.linspace(0.1, 0.9, 11)), curve(np.linspace(0.1, 0.6, 11))
    self.assertTrue(claims.fewer_pristine_learned_slower(fast, slow).passed)
    self.assertFalse(claims.fewer_pristine_learned_slower(slow, fast).passed)

  def test_fewer_pristine_not_shown(self):
    flat = curve(np.full(11, 0.5))
    self.assertEqual(claims.fewer_pristine_learned_slower(flat, flat).text, 'NOT SHOWN (tied)')
    late = curve([0.5, 0.6], steps=[100, 200])
    self.assertEqual(claims.fewer_pristine_learned_slower(late, late).text,
                     'NOT SHOWN (no pristine accuracy logged at steps 1-10)')

  def test_all_fit(self):
    self.assertTrue(claims.all_fit({0: 1.0, 1: 0.995}).passed)
    self.assertFalse(claims.all_fit({0: 1.0, 1: 0.9}).passed)
    self.assertEqual(claims.all_fit({0: 1.0, 1: np.nan}).text,
                     'NOT SHOWN (a final training accuracy is NaN)')
    self.assertEqual(claims.all_fit({}).outcome, claims.NOT_SHOWN)

  def test_all_fit_in_time_says_when_each_run_fit(self):
    fits_late = curve([0.5, 0.98, 0.992, 0.989, 0.995], steps=[0, 100, 200, 300, 400])
    fits_early = curve([0.9, 1.0], steps=[0, 60])
    verdict = claims.all_fit_in_time({0.5: fits_late, 0.0: fits_early})
    self.assertTrue(verdict.passed)
    # The first evaluation at >= 99%, not the first from which it stays there.
    self.assertEqual(verdict.measured, 'first step at >= 99% train acc (final acc at step): '
                     '0%: 60 (1.0000 at 60), 50%: 200 (0.9950 at 400)')
    dips_at_the_end = curve([0.5, 0.995, 0.97], steps=[0, 100, 200])
    self.assertFalse(claims.all_fit_in_time({0.0: fits_early, 1.0: dips_at_the_end}).passed)
    never = claims.all_fit_in_time({1.0: curve([0.1, 0.86], steps=[0, 200000])})
    self.assertFalse(never.passed)
    self.assertIn('100%: never (0.8600 at 200000)', never.measured)
    self.assertEqual(claims.all_fit_in_time({0.0: curve([0.5, np.nan])}).text,
                     'NOT SHOWN (a final training accuracy is NaN)')
    self.assertEqual(claims.all_fit_in_time({}).outcome, claims.NOT_SHOWN)

  def test_crossing(self):
    steps = np.arange(4)
    crossing = np.array([[0.8, 0.2], [0.6, 0.4], [0.4, 0.6], [0.5, 0.5]])
    self.assertTrue(claims.pristine_dominates_then_crosses(steps, crossing).passed)
    self.assertIn('at step 2', claims.pristine_dominates_then_crosses(steps, crossing).measured)
    self.assertFalse(claims.pristine_dominates_then_crosses(steps, crossing[:2]).passed)
    self.assertFalse(claims.pristine_dominates_then_crosses(steps, crossing[::-1]).passed)
    with_nan = crossing.copy()
    with_nan[1] = np.nan
    self.assertEqual(claims.pristine_dominates_then_crosses(steps, with_nan).outcome,
                     claims.NOT_SHOWN)
    self.assertEqual(claims.pristine_dominates_then_crosses(steps, crossing[:0]).outcome,
                     claims.NOT_SHOWN)

  def test_nulls(self):
    flat = np.tile([[0.55, 0.45]], (5, 3, 1))
    self.assertEqual(claims.nulls_do_not_cross(flat).text, 'PASS')
    crossing = flat.copy()
    crossing[3, 1] = [0.4, 0.6]
    self.assertEqual(claims.nulls_do_not_cross(crossing).measured,
                     '1 of 3 null worlds start with f^p > f^c and cross')
    self.assertFalse(claims.nulls_do_not_cross(crossing).passed)
    self.assertEqual(claims.nulls_do_not_cross(flat[:, :0]).text,
                     'NOT SHOWN (no null worlds were measured (--null_worlds=0))')
    with_nan = flat.copy()
    with_nan[2, 0] = np.nan
    self.assertEqual(claims.nulls_do_not_cross(with_nan).text,
                     'NOT SHOWN (some f are NaN (a zero total gradient))')

  def test_winsorized_stays_at_proper(self):
    # The bound is proper + 0.02, both ways.
    self.assertTrue(claims.winsorized_stays_at_proper(0.565, 0.55).passed)
    self.assertFalse(claims.winsorized_stays_at_proper(0.575, 0.55).passed)
    self.assertFalse(claims.winsorized_stays_at_proper(0.98, 0.55).passed)
    self.assertEqual(claims.winsorized_stays_at_proper(np.nan, 0.55).outcome, claims.NOT_SHOWN)

  def test_a_network_that_learned_nothing_passes_only_trivially(self):
    learned = claims.winsorized_stays_at_proper(0.50, 0.55, final_test_accuracy=0.84)
    self.assertEqual(learned.text, 'PASS')
    collapsed = claims.winsorized_stays_at_proper(0.112, 0.775, final_test_accuracy=0.114)
    self.assertTrue(collapsed.passed)
    self.assertEqual(collapsed.text, 'PASS (trivially: the network learned nothing)')
    self.assertIn('final test acc 0.114', collapsed.measured)
    # With every label random, learning nothing is what the claim asks for.
    self.assertEqual(claims.winsorized_stays_at_proper(0.11, 0.1, final_test_accuracy=0.1).text,
                     'PASS')

  def test_not_run(self):
    verdict = claims.not_run(['winsorized/n0.5_c8'])
    self.assertEqual(verdict.outcome, claims.NOT_RUN)
    self.assertFalse(verdict.passed)
    self.assertEqual(verdict.text, 'NOT RUN')
    self.assertEqual(verdict.measured, 'waiting for winsorized/n0.5_c8')
    self.assertEqual(claims.Verdict('m', claims.FAIL).text, 'FAIL')
    with self.assertRaises(ValueError):
      claims.Verdict('m', claims.NOT_SHOWN)

  def test_overfit_falls_with_c(self):
    self.assertTrue(claims.overfit_falls_with_c({0: 0.4, 2: 0.2, 8: 0.0}).passed)
    self.assertFalse(claims.overfit_falls_with_c({0: 0.4, 2: 0.5, 8: 0.0}).passed)
    self.assertEqual(claims.overfit_falls_with_c({0: 0.4, 2: 0.0, 8: 0.0}).text,
                     'NOT SHOWN (tied: c=2 and c=8)')
    self.assertEqual(claims.overfit_falls_with_c({0: 0.4, 2: np.nan}).text,
                     'NOT SHOWN (a final overfit is NaN)')
    self.assertEqual(claims.overfit_falls_with_c({0: 0.4}).outcome, claims.NOT_SHOWN)

  def test_early_stopping(self):
    self.assertTrue(claims.early_stopping_helps(curve([0.1, 0.9, 0.7])).passed)
    self.assertFalse(claims.early_stopping_helps(curve([0.1, 0.8, 0.9])).passed)
    # The margin is 0.01.
    self.assertFalse(claims.early_stopping_helps(curve([0.1, 0.905, 0.9])).passed)
    self.assertEqual(claims.early_stopping_helps(curve([np.nan, np.nan])).outcome,
                     claims.NOT_SHOWN)

  @parameterized.named_parameters(
      ('all_pass', [claims.PASS, claims.PASS, claims.PASS], 'PASS (3/3 seeds pass)'),
      ('one_fails', [claims.PASS, claims.FAIL, claims.PASS], 'FAIL (2/3 seeds pass)'),
      ('seed_0_fails', [claims.FAIL, claims.PASS, claims.PASS], 'FAIL (2/3 seeds pass)'),
      ('undecided', [claims.PASS, claims.NOT_SHOWN, claims.PASS], 'NOT SHOWN (r; 2/3 seeds pass)'),
      ('fail_beats_undecided', [claims.NOT_SHOWN, claims.FAIL], 'FAIL (0/2 seeds pass)'),
      ('trivial', [claims.PASS, claims.TRIVIAL], 'PASS (trivially: r; 2/2 seeds pass)'),
      ('not_run', [claims.PASS, claims.NOT_RUN, claims.PASS],
       'PASS (2/2 seeds pass; 1 not run)'),
      ('only_one_ran', [claims.NOT_RUN, claims.FAIL], 'FAIL (0/1 seeds pass; 1 not run)'),
      ('none_ran', [claims.NOT_RUN, claims.NOT_RUN], 'NOT RUN'),
      ('one_seed', [claims.TRIVIAL], 'PASS (trivially: r)'))
  def test_over_seeds(self, outcomes, text):
    verdicts = [claims.Verdict(f'm{i}', outcome, 'r' if outcome in (claims.TRIVIAL,
                                                                     claims.NOT_SHOWN) else '')
                for i, outcome in enumerate(outcomes)]
    self.assertEqual(claims.over_seeds(verdicts).text, text)

  def test_over_seeds_shows_the_first_finished_seed(self):
    verdicts = [claims.not_run(['a']), claims.Verdict('m1', claims.PASS),
                claims.Verdict('m2', claims.PASS)]
    self.assertEqual(claims.over_seeds(verdicts).measured, 'seed 1: m1')
    self.assertEqual(claims.over_seeds(verdicts[:2]).measured, 'm1')

  def test_count(self):
    verdicts = [claims.Verdict('m', o, 'r' if o in (claims.TRIVIAL, claims.NOT_SHOWN) else '')
                for o in [claims.PASS] * 3 + [claims.TRIVIAL] * 2 + [claims.FAIL] +
                [claims.NOT_SHOWN] + [claims.NOT_RUN] * 2]
    self.assertEqual(claims.count(verdicts), '3 pass, 2 pass trivially, 1 fail, 1 not shown, of 7 '
                     'checks; 2 wait for runs that are not finished')
    self.assertEqual(claims.count(verdicts[:3]), '3 pass, 0 pass trivially, 0 fail, 0 not shown, '
                     'of 3 checks')

  def test_markdown(self):
    table = claims.as_markdown([{'section': '2.3', 'claim': 'c', 'test': 't', 'measured': 'm',
                                 'verdict': 'PASS'}])
    self.assertEqual(table.splitlines()[-1], '| 2.3 | c | t | m | PASS |')

  def test_markdown_reads_back(self):
    rows = [{'section': '2.3 (1)', 'claim': 'a (25%)', 'test': 't >= 90%', 'measured': 'm 0.5',
             'verdict': 'PASS (trivially: x)'},
            {'section': '3.3', 'claim': 'b', 'test': 't', 'measured': 'n', 'verdict': 'NOT RUN'}]
    text = '# title\n\nprose | with a bar\n\n' + claims.as_markdown(rows) + '\n\n![f](f.png)\n'
    self.assertEqual(claims.read_markdown(text),
                     {('2.3 (1)', 'a (25%)'): rows[0], ('3.3', 'b'): rows[1]})

  def test_a_report_drawn_beside_another_reads_back_as_its_own_numbers(self):
    columns = (*claims.COLUMNS[:3], ('measured', 'measured (full)'), ('verdict', 'verdict (full)'),
               ('other_measured', 'measured (mini)'), ('other_verdict', 'verdict (mini)'))
    row = {'section': '3.3', 'claim': 'c = 8 (100%)', 'test': 't', 'measured': 'full says 0.112',
           'verdict': 'PASS', 'other_measured': 'mini says 0.319', 'other_verdict': 'FAIL'}
    text = claims.as_markdown([row], columns) + '\n\n' + claims.as_markdown(
        [{'section': '9', 'claim': 'another table', 'test': 't', 'measured': 'm', 'verdict': 'v'}],
        (('section', 'x'), ('claim', 'y'), ('test', 'z'), ('measured', 'w'), ('verdict', 'v')))
    self.assertEqual(claims.read_markdown(text), {('3.3', 'c = 8 (100%)'): {
        'section': '3.3', 'claim': 'c = 8 (100%)', 'test': 't', 'measured': 'full says 0.112',
        'verdict': 'PASS'}})

  def test_markdown_with_other_columns(self):
    table = claims.as_markdown([{'a': '1', 'b': '2'}, {'a': '3'}], (('a', 'A'), ('b', 'B')))
    self.assertEqual(table.splitlines(), ['| A | B |', '|---|---|', '| 1 | 2 |', '| 3 |  |'])
