"""The evaluation schedule."""

import tensorflow as tf

from cg_tf import schedule


class ScheduleTest(tf.test.TestCase):

  def test_log_spaced_as_the_authors(self):
    steps = schedule.log_spaced_steps(100_000)
    self.assertEqual(steps[:12], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20])
    self.assertIn(900, steps)
    self.assertIn(9000, steps)
    self.assertNotIn(11000, steps)
    self.assertEqual(steps[-3:], [80_000, 90_000, 100_000])
    self.assertLen(steps, 10 + 9 * 3 + 10)

  def test_evaluation_steps(self):
    steps = schedule.evaluation_steps(1234, eval_every=500, checkpoint_every=300)
    for s in (0, 9, 90, 300, 500, 600, 900, 1000, 1200, 1234):
      self.assertIn(s, steps)
    self.assertEqual(steps, sorted(set(steps)))
    self.assertEqual(max(steps), 1234)
