"""The per-example learning record: when each training example is learned (§2.3).

An example is fitted at an evaluation when the model predicts its training
label. Two steps per example summarise its history over the evaluations:
first_learned_step, the first evaluated step at which it was fitted, and
learned_since_step, the step from which it has stayed fitted (-1 for never,
and for not fitted now). run.py keeps both in examples.npz, and
keras.TrainingSetRecord keeps them for `fit`. NumPy only, so the claims
checks read it without TensorFlow.
"""

import numpy as np


def learning_times(first: np.ndarray, since: np.ndarray, fitted: np.ndarray, step: int):
  """The per-example learning record after an evaluation at `step`.

  Args:
    first: int64 [n] the first evaluated step at which each example was fitted (-1: never).
    since: int64 [n] the step since which it has been fitted without a break (-1: not now).
    fitted: bool [n] whether the model fits it now.
    step: the step of this evaluation, later than any in `first` and `since`.

  Returns:
    (first, since), updated copies.
  """
  first, since = first.copy(), since.copy()
  first[(first < 0) & fitted] = step
  since[~fitted] = -1
  since[(since < 0) & fitted] = step
  return first, since


def median_step(steps: np.ndarray) -> float:
  """Median of per-example steps [n] from the learning record, -1 (never) counted as inf.

  An example never learned (or, for learned_since_step, not fitted at the end) counts as
  learned after every step, so a group most of which was never learned has median inf.
  """
  steps = np.asarray(steps)
  return float(np.median(np.where(steps < 0, np.inf, steps).astype(np.float64)))
