"""Every claim check on a synthetic curve that passes and one that fails."""

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
    self.assertTrue(claims.time_to_accuracy_grows_with_noise({0: fast, 0.5: slow,
                                                              1: never}).passed)
    self.assertFalse(claims.time_to_accuracy_grows_with_noise({0: slow, 0.5: fast}).passed)

  def test_pristine_learned_first(self):
    corrupt = np.array([False, False, True, True])
    self.assertTrue(claims.pristine_learned_first(np.array([1, 2, 50, -1]), corrupt).passed)
    self.assertFalse(claims.pristine_learned_first(np.array([50, -1, 1, 2]), corrupt).passed)

  def test_fewer_pristine_learned_slower(self):
    fast, slow = curve(np.linspace(0.1, 0.9, 11)), curve(np.linspace(0.1, 0.6, 11))
    self.assertTrue(claims.fewer_pristine_learned_slower(fast, slow).passed)
    self.assertFalse(claims.fewer_pristine_learned_slower(slow, fast).passed)

  def test_all_fit(self):
    self.assertTrue(claims.all_fit({0: 1.0, 1: 0.995}).passed)
    self.assertFalse(claims.all_fit({0: 1.0, 1: 0.9}).passed)

  def test_crossing(self):
    steps = np.arange(4)
    crossing = np.array([[0.8, 0.2], [0.6, 0.4], [0.4, 0.6], [0.5, 0.5]])
    self.assertTrue(claims.pristine_dominates_then_crosses(steps, crossing).passed)
    self.assertIn('at step 2', claims.pristine_dominates_then_crosses(steps, crossing).measured)
    self.assertFalse(claims.pristine_dominates_then_crosses(steps, crossing[:2]).passed)
    self.assertFalse(claims.pristine_dominates_then_crosses(steps, crossing[::-1]).passed)

  def test_nulls(self):
    flat = np.tile([[0.55, 0.45]], (5, 3, 1))
    self.assertTrue(claims.nulls_do_not_cross(flat).passed)
    crossing = flat.copy()
    crossing[3, 1] = [0.4, 0.6]
    self.assertFalse(claims.nulls_do_not_cross(crossing).passed)

  def test_winsorized_stays_at_proper(self):
    self.assertTrue(claims.winsorized_stays_at_proper(0.56, 0.55).passed)
    self.assertFalse(claims.winsorized_stays_at_proper(0.98, 0.55).passed)

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
    self.assertIsNone(verdict.passed)
    self.assertEqual(verdict.text, 'NOT RUN')
    self.assertEqual(verdict.measured, 'waiting for winsorized/n0.5_c8')
    self.assertEqual(claims.Verdict('m', False).text, 'FAIL')

  def test_overfit_falls_with_c(self):
    self.assertTrue(claims.overfit_falls_with_c({0: 0.4, 2: 0.2, 8: 0.0}).passed)
    self.assertFalse(claims.overfit_falls_with_c({0: 0.4, 2: 0.5, 8: 0.0}).passed)

  def test_early_stopping(self):
    self.assertTrue(claims.early_stopping_helps(curve([0.1, 0.9, 0.7])).passed)
    self.assertFalse(claims.early_stopping_helps(curve([0.1, 0.8, 0.9])).passed)

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

  def test_markdown_with_other_columns(self):
    table = claims.as_markdown([{'a': '1', 'b': '2'}, {'a': '3'}], (('a', 'A'), ('b', 'B')))
    self.assertEqual(table.splitlines(), ['| A | B |', '|---|---|', '| 1 | 2 |', '| 3 |  |'])
