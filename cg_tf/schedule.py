"""Which steps get evaluated and checkpointed."""

from typing import List


def log_spaced_steps(total_steps: int) -> List[int]:
  """The authors' evaluation steps: 0-9, every 10 to 90, every 100 to 900,
  every 1,000 to 9,000, then every 10,000, all up to `total_steps`."""
  steps = set(range(10))
  for scale in (10, 100, 1000):
    steps.update(scale * k for k in range(1, 10))
  steps.update(range(0, total_steps + 1, 10_000))
  return sorted(s for s in steps if s <= total_steps)


def checkpoint_steps(total_steps: int, checkpoint_every: int) -> List[int]:
  """Every `checkpoint_every` steps from 0, and the last step."""
  return sorted(set(range(0, total_steps + 1, checkpoint_every)) | {total_steps})


def evaluation_steps(total_steps: int, eval_every: int, checkpoint_every: int) -> List[int]:
  """Every step at which the loop stops to evaluate, ascending.

  The log-spaced steps, every `eval_every`, every `checkpoint_every` (a
  checkpoint always follows an evaluation, so a resumed run has the metrics of
  the step it restarts from) and the last step.
  """
  steps = set(log_spaced_steps(total_steps))
  steps.update(range(0, total_steps + 1, eval_every))
  steps.update(checkpoint_steps(total_steps, checkpoint_every))
  return sorted(steps)


def decomposition_steps(total_steps: int, every: int, dense_steps: int) -> List[int]:
  """Steps of the §2.4 decomposition: each step to `dense_steps`, the log-spaced
  steps (Figure 2 is read on a log axis), and every `every`.

  Empty when `every` is 0 (the decomposition is off).
  """
  if every == 0:
    return []
  steps = set(range(0, min(dense_steps, total_steps) + 1)) | set(log_spaced_steps(total_steps))
  steps.update(range(0, total_steps + 1, every))
  return sorted(steps)
