"""cg_tf.learning: the per-example learning record, against a loop over each example's history."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from cg_tf import learning


def record_by_loop(steps, fitted_history):
  """(first, since) from each example's whole history [evaluations][n], by a loop."""
  n = len(fitted_history[0])
  first, since = [-1] * n, [-1] * n
  for e in range(n):
    for step, fitted in zip(steps, fitted_history):
      if fitted[e] and first[e] < 0:
        first[e] = step
    streak_start = -1
    for step, fitted in zip(steps, fitted_history):
      streak_start = (step if streak_start < 0 else streak_start) if fitted[e] else -1
    since[e] = streak_start
  return first, since


class LearningTimesTest(parameterized.TestCase):

  @parameterized.parameters(0, 1, 2, 3)
  def test_against_a_loop_over_the_history(self, seed):
    rng = np.random.default_rng(seed)
    steps = sorted(rng.choice(10_000, size=12, replace=False).tolist())
    # Examples fitted, forgotten and refitted; one never fitted, one always.
    history = rng.random([12, 40]) < rng.uniform(0.2, 0.9, size=[12, 1])
    history[:, 0], history[:, 1] = False, True
    first, since = np.full(40, -1, np.int64), np.full(40, -1, np.int64)
    for step, fitted in zip(steps, history):
      before = first.copy()
      first, since = learning.learning_times(first, since, fitted, step)
      self.assertTrue(np.all(before[before >= 0] == first[before >= 0]))  # copies; first is kept
    expected_first, expected_since = record_by_loop(steps, history)
    self.assertEqual(first.tolist(), expected_first)
    self.assertEqual(since.tolist(), expected_since)
    self.assertEqual((first[0], since[0]), (-1, -1))
    self.assertEqual((first[1], since[1]), (steps[0], steps[0]))

  def test_known_answer(self):
    first, since = np.array([-1, 5, 5, -1]), np.array([-1, 5, -1, -1])
    fitted = np.array([True, True, True, False])
    self.assertEqual([a.tolist() for a in learning.learning_times(first, since, fitted, 9)],
                     [[9, 5, 5, -1], [9, 5, 9, -1]])
    self.assertEqual(first.tolist(), [-1, 5, 5, -1])  # the inputs are left alone


class MedianStepTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 7, 40)
  def test_counts_never_as_after_every_step(self, n):
    rng = np.random.default_rng(n)
    steps = rng.choice([-1, 0, 3, 3, 10, 2000], size=n)
    ordered = sorted(float('inf') if s < 0 else float(s) for s in steps)
    middle = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2 if n % 2 == 0 else ordered[n // 2]
    self.assertEqual(learning.median_step(steps), middle)
    self.assertEqual(learning.median_step(np.full(n, -1)), float('inf'))


if __name__ == '__main__':
  absltest.main()
