"""The paper's claims as small checks on measured curves.

Each check takes plain arrays or pandas Series (curves indexed by step) and
returns a `Verdict`: the measured quantity in words and numbers, and one of
five outcomes:
- PASS: the numbers support the claim;
- PASS (trivially: ...): they meet it only because of something that makes
  the claim empty, e.g. a network that learned nothing stays under a bound;
- FAIL: the numbers contradict it;
- NOT SHOWN (...): the evidence cannot decide, and the reason says what was
  seen: no curve reached the level, values tied where an ordering is
  claimed, NaN or empty inputs, no null worlds;
- NOT RUN: the runs it needs have not finished.
`reproduce.py` applies the checks to run directories and combines seeds by
`over_seeds`; tests/test_claims.py and tests/test_report.py give each check
inputs with known answers.
"""

import dataclasses
import math
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from cg_tf import learning

PASS, TRIVIAL, FAIL, NOT_SHOWN, NOT_RUN = 'pass', 'trivial', 'fail', 'not shown', 'not run'
OUTCOMES = (PASS, TRIVIAL, FAIL, NOT_SHOWN, NOT_RUN)
_WORDS = {PASS: 'PASS', TRIVIAL: 'PASS', FAIL: 'FAIL', NOT_SHOWN: 'NOT SHOWN', NOT_RUN: 'NOT RUN'}


@dataclasses.dataclass(frozen=True)
class Verdict:
  """What was measured, and what it says of the claim.

  Attributes:
    measured: the quantity in words and numbers.
    outcome: one of OUTCOMES.
    reason: for TRIVIAL, why the pass is empty; for NOT_SHOWN, what was seen.
    seeds: for a verdict over seeds, e.g. '2/3 seeds pass'; empty for one seed.
  """
  measured: str
  outcome: str
  reason: str = ''
  seeds: str = ''

  def __post_init__(self):
    if self.outcome not in OUTCOMES:
      raise ValueError(f'outcome must be one of {OUTCOMES}, not {self.outcome!r}')
    if self.outcome in (TRIVIAL, NOT_SHOWN) and not self.reason:
      raise ValueError(f'a {self.outcome!r} verdict needs its reason')

  @property
  def passed(self) -> bool:
    """True for PASS and for a trivial PASS."""
    return self.outcome in (PASS, TRIVIAL)

  @property
  def text(self) -> str:
    """The verdict column: the word, then the reason and the seed count in brackets."""
    reason = {TRIVIAL: f'trivially: {self.reason}', NOT_SHOWN: self.reason}.get(self.outcome, '')
    inside = '; '.join(part for part in (reason, self.seeds) if part)
    return f'{_WORDS[self.outcome]} ({inside})' if inside else _WORDS[self.outcome]


def decided(measured: str, passed: bool, trivial: str = '') -> Verdict:
  """PASS or FAIL by `passed`; a pass is TRIVIAL with the reason `trivial` if given."""
  if not passed:
    return Verdict(measured, FAIL)
  return Verdict(measured, TRIVIAL, trivial) if trivial else Verdict(measured, PASS)


def not_shown(measured: str, reason: str) -> Verdict:
  return Verdict(measured, NOT_SHOWN, reason)


def not_run(missing: Sequence[str]) -> Verdict:
  """The verdict of a check whose runs `missing` have not finished."""
  return Verdict(f'waiting for {", ".join(missing)}', NOT_RUN)


def over_seeds(verdicts: Sequence[Verdict]) -> Verdict:
  """One verdict from the same check on each seed (seed 0 first).

  The rule: a claim passes only if every finished seed passes it. Any failing
  seed makes it FAIL; otherwise any seed that cannot decide makes it NOT
  SHOWN; otherwise any trivial pass makes it a trivial PASS. Seeds whose runs
  have not finished count for nothing and are named as not run. The
  measurement shown is the first finished seed's.
  """
  finished = [v for v in verdicts if v.outcome != NOT_RUN]
  if len(verdicts) == 1 or not finished:
    return verdicts[0]
  for outcome in (FAIL, NOT_SHOWN, TRIVIAL, PASS):
    deciding = [v for v in finished if v.outcome == outcome]
    if deciding:
      break
  passing = sum(v.passed for v in finished)
  seeds = f'{passing}/{len(finished)} seeds pass'
  if len(finished) < len(verdicts):
    seeds += f'; {len(verdicts) - len(finished)} not run'
  first = finished[0]
  seed = verdicts.index(first)
  measured = first.measured if len(finished) == 1 else f'seed {seed}: {first.measured}'
  return Verdict(measured, outcome, deciding[0].reason, seeds)


def count(verdicts: Sequence[Verdict]) -> str:
  """The report header's tally, e.g. '21 pass, 5 pass trivially, 3 fail, 1 not shown of 30 checks;
  2 wait for runs that are not finished'."""
  tally = {outcome: sum(v.outcome == outcome for v in verdicts) for outcome in OUTCOMES}
  checked = len(verdicts) - tally[NOT_RUN]
  text = (f'{tally[PASS]} pass, {tally[TRIVIAL]} pass trivially, {tally[FAIL]} fail, '
          f'{tally[NOT_SHOWN]} not shown, of {checked} checks')
  if tally[NOT_RUN]:
    text += f'; {tally[NOT_RUN]} wait for runs that are not finished'
  return text


def _has_nan(*values) -> bool:
  return any(np.isnan(np.asarray(v, np.float64)).any() for v in values)


def _ordering(values: Sequence[float], names: Sequence[str], descending: bool = False):
  """Whether `values` grow (shrink, with `descending`) strictly from one to the next.

  Returns:
    (outcome, reason): FAIL if some step goes the wrong way, NOT_SHOWN with the
    tied pairs (equal values, two infinities) if some step is flat, else PASS.
  """
  sign = -1 if descending else 1
  wrong, tied = [], []
  for (a, name_a), (b, name_b) in zip(zip(values, names), zip(values[1:], names[1:])):
    if a == b:
      tied.append(f'{name_a} and {name_b}')
    elif sign * (b - a) < 0:
      wrong.append(f'{name_a} and {name_b}')
  if wrong:
    return FAIL, ''
  if tied:
    return NOT_SHOWN, f'tied: {", ".join(tied)}'
  return PASS, ''


def first_step_reaching(curve: pd.Series, level: float) -> Optional[int]:
  """First step at which curve >= level; None if never."""
  reached = curve[curve >= level]
  return None if reached.empty else int(reached.index[0])


def time_to_accuracy_grows_with_noise(train_accuracy: Mapping[float, pd.Series],
                                      level: float = 0.9) -> Verdict:
  """§2.3 (1): the step at which training accuracy first reaches `level` grows with noise.

  A noise level that never reaches `level` comes after every one that does;
  two that never do, or two that first reach it at the same evaluated step,
  are not ordered by the evidence.
  """
  steps = {noise: first_step_reaching(curve, level) for noise, curve in
           sorted(train_accuracy.items())}
  text = ', '.join(f'{n:.0%}: {"never" if s is None else s}' for n, s in steps.items())
  measured = f'step to {level:.0%} train acc: {text}'
  if not steps:
    return not_shown(measured, 'no runs')
  if all(s is None for s in steps.values()):
    return not_shown(measured, f'no run reached {level:.0%}')
  outcome, reason = _ordering([math.inf if s is None else s for s in steps.values()],
                              [f'{n:.0%}' for n in steps])
  return Verdict(measured, outcome, reason)


def step_word(step: float) -> str:
  """A step for a table or a verdict: 'never' for inf."""
  return 'never' if np.isinf(step) else f'{step:g}'


def pristine_learned_first(learned_since_step: np.ndarray, first_learned_step: np.ndarray,
                           corrupt: np.ndarray) -> Verdict:
  """§2.3 (2): pristine examples are learned before corrupt ones.

  Judged on each group's median `learned_since_step` [n], the evaluation step from which
  an example stays fitted to the end; one not fitted at the end counts as learned after
  every step. The median `first_learned_step` [n] is shown beside it but does not decide:
  the first evaluation that happens to give an example its label counts, and with 10
  classes the dozen evaluations of the first 10 steps give about half of the corrupt
  examples their random label once by chance, so at high noise that median says little.
  """
  corrupt = np.asarray(corrupt, bool)
  if not corrupt.any() or corrupt.all():
    return not_shown(f'{corrupt.sum()} corrupt of {corrupt.size} examples',
                     'needs both pristine and corrupt examples')
  since, first = (np.asarray(steps) for steps in (learned_since_step, first_learned_step))
  pristine, corrupted = (learning.median_step(since[~corrupt]),
                         learning.median_step(since[corrupt]))
  measured = (f'median learned-since step: pristine {step_word(pristine)}, '
              f'corrupt {step_word(corrupted)} (first learned: '
              f'{step_word(learning.median_step(first[~corrupt]))}, '
              f'{step_word(learning.median_step(first[corrupt]))})')
  if pristine == corrupted:
    return not_shown(measured, 'tied' if np.isfinite(pristine) else
                     'most examples of both groups are not fitted at the end')
  return decided(measured, bool(pristine < corrupted))


def fewer_pristine_learned_slower(clean_pristine_accuracy: pd.Series,
                                  noisy_pristine_accuracy: pd.Series,
                                  steps: Sequence[int] = tuple(range(1, 11))) -> Verdict:
  """§2.3 (3): with fewer pristine examples they are learned more slowly (first steps)."""
  clean = float(clean_pristine_accuracy.reindex(steps).mean())
  noisy = float(noisy_pristine_accuracy.reindex(steps).mean())
  measured = (f'mean pristine accuracy over steps {steps[0]}-{steps[-1]}: '
              f'{clean:.3f} clean vs {noisy:.3f} noisy')
  if _has_nan(clean, noisy):
    return not_shown(measured, f'no pristine accuracy logged at steps {steps[0]}-{steps[-1]}')
  if clean == noisy:
    return not_shown(measured, 'tied')
  return decided(measured, clean > noisy)


def all_fit(final_train_accuracy: Mapping[float, float], level: float = 0.99) -> Verdict:
  """§2.3: every noise level ends with (nearly) 100% training accuracy."""
  text = ', '.join(f'{n:.0%}: {a:.4f}' for n, a in sorted(final_train_accuracy.items()))
  measured = f'final train acc {text}'
  if not final_train_accuracy:
    return not_shown(measured, 'no runs')
  if _has_nan(list(final_train_accuracy.values())):
    return not_shown(measured, 'a final training accuracy is NaN')
  return decided(measured, all(a >= level for a in final_train_accuracy.values()))


def all_fit_in_time(train_accuracy: Mapping[float, pd.Series], level: float = 0.99) -> Verdict:
  """§2.3 for runs of different lengths: every noise level ends at >= `level` training
  accuracy; the measurement says how long each took.

  train_accuracy: noise -> training accuracy by evaluated step. Shows, per noise
  level, the first evaluated step at >= `level` (how long the network needs to fit)
  and the final accuracy with the step it was measured at.
  """
  parts, finals = [], []
  for noise, curve in sorted(train_accuracy.items()):
    reached = first_step_reaching(curve, level)
    finals.append(float(curve.iloc[-1]))
    parts.append(f'{noise:.0%}: {"never" if reached is None else reached} '
                 f'({finals[-1]:.4f} at {int(curve.index[-1])})')
  measured = f'first step at >= {level:.0%} train acc (final acc at step): {", ".join(parts)}'
  if not parts:
    return not_shown(measured, 'no runs')
  if _has_nan(finals):
    return not_shown(measured, 'a final training accuracy is NaN')
  return decided(measured, all(a >= level for a in finals))


def crosses(f_pristine: np.ndarray, f_corrupt: np.ndarray) -> Optional[int]:
  """Index of the first measurement with f^p < f^c after starting with f^p > f^c."""
  if not f_pristine[0] > f_corrupt[0]:
    return None
  below = np.nonzero(f_pristine < f_corrupt)[0]
  return None if below.size == 0 else int(below[0])


def pristine_dominates_then_crosses(steps: np.ndarray, f: np.ndarray) -> Verdict:
  """§2.4: f^p starts above f^c and they cross. f: [T, 2] (f^p, f^c) at `steps`."""
  if len(f) == 0:
    return not_shown('no measurements', 'the run recorded no decomposition')
  index = crosses(f[:, 0], f[:, 1])
  where = 'never' if index is None else f'at step {int(steps[index])}'
  measured = f'f^p(0) = {f[0, 0]:.3f}, f^c(0) = {f[0, 1]:.3f}; crossing {where}'
  if _has_nan(f):
    return not_shown(measured, 'some f are NaN (a zero total gradient)')
  return decided(measured, index is not None)


def nulls_do_not_cross(f_nulls: np.ndarray) -> Verdict:
  """§2.4: in null worlds f^p and f^c do not cross. f_nulls: [T, K, 2]."""
  f_nulls = np.asarray(f_nulls, np.float64)
  worlds = f_nulls.shape[1] if f_nulls.ndim == 3 else 0
  crossings = [crosses(f_nulls[:, k, 0], f_nulls[:, k, 1]) for k in range(worlds)
               if len(f_nulls)]
  number = sum(c is not None for c in crossings)
  measured = f'{number} of {worlds} null worlds start with f^p > f^c and cross'
  if not worlds or not len(f_nulls):
    return not_shown(measured, 'no null worlds were measured (--null_worlds=0)')
  if _has_nan(f_nulls):
    return not_shown(measured, 'some f are NaN (a zero total gradient)')
  return decided(measured, number == 0)


def proper_accuracy(noise: float) -> float:
  """Fraction of training labels left correct by permuting a `noise` fraction (§2.1)."""
  return 1 - noise + 0.1 * noise


def learned_nothing(final_test_accuracy: float, chance: float = 0.1, margin: float = 0.1) -> bool:
  """True if test accuracy ended within `margin` of chance: e.g. one class predicted for every input."""
  return final_test_accuracy < chance + margin


def winsorized_stays_at_proper(final_train_accuracy: float, proper: float,
                               tolerance: float = 0.02,
                               final_test_accuracy: Optional[float] = None) -> Verdict:
  """§3.3: for c > 1 training accuracy does not exceed the proper accuracy `proper`.

  With `final_test_accuracy` given and some labels proper (proper > 0.1), a
  run that learned nothing (see `learned_nothing`) meets the bound trivially.
  With every label random, learning nothing is the claim.
  """
  measured = f'final train acc {final_train_accuracy:.3f} vs proper {proper:.3f}'
  trivial = ''
  if (final_test_accuracy is not None and proper > 0.1 + 1e-9 and
      learned_nothing(final_test_accuracy)):
    measured += f', final test acc {final_test_accuracy:.3f}'
    trivial = 'the network learned nothing'
  if _has_nan(final_train_accuracy):
    return not_shown(measured, 'the final training accuracy is NaN')
  return decided(measured, final_train_accuracy <= proper + tolerance, trivial)


def overfit_falls_with_c(final_overfit: Mapping[float, float]) -> Verdict:
  """§3.3: the overfit reached grows more slowly as c grows: final overfit falls strictly with c."""
  cs = sorted(final_overfit)
  text = ', '.join(f'c={c:g}: {final_overfit[c]:.4f}' for c in cs)
  measured = f'final overfit {text}'
  if len(cs) < 2:
    return not_shown(measured, 'needs two or more values of c')
  if _has_nan([final_overfit[c] for c in cs]):
    return not_shown(measured, 'a final overfit is NaN')
  outcome, reason = _ordering([final_overfit[c] for c in cs], [f'c={c:g}' for c in cs],
                              descending=True)
  return Verdict(measured, outcome, reason)


def early_stopping_helps(test_accuracy: pd.Series, margin: float = 0.01) -> Verdict:
  """§2.3: the best test accuracy during training beats the final one by `margin`."""
  test_accuracy = test_accuracy.dropna()
  if test_accuracy.empty:
    return not_shown('no test accuracy', 'the run logged no test accuracy')
  best, final = float(test_accuracy.max()), float(test_accuracy.iloc[-1])
  return decided(f'best test acc {best:.3f} (step {int(test_accuracy.idxmax())}) vs final '
                 f'{final:.3f}', best >= final + margin)


COLUMNS = (('section', '§'), ('claim', 'the paper says'), ('test', 'quantity'),
           ('measured', 'measured'), ('verdict', 'verdict'))


def as_markdown(rows: Sequence[Dict[str, str]], columns=COLUMNS) -> str:
  """Rows of dicts as a markdown table; `columns` is [(key, header)], by default COLUMNS."""
  lines = ['| ' + ' | '.join(header for _, header in columns) + ' |',
           '|' + '---|' * len(columns)]
  for row in rows:
    lines.append('| ' + ' | '.join(row.get(key, '') for key, _ in columns) + ' |')
  return '\n'.join(lines)


def read_markdown(text: str) -> Dict[tuple, Dict[str, str]]:
  """The claims table of a report that `as_markdown` wrote: {(section, claim): row}.

  The table is found by its header, which begins with COLUMNS' first three
  headers. A report drawn beside another has the headers 'measured (full)',
  'verdict (full)', 'measured (mini)', ...: the first measured and verdict
  columns, the report's own, are read. Lines outside that table are ignored.
  """
  rows, column_of = {}, None
  for line in text.splitlines():
    if not line.startswith('|'):
      column_of = None
      continue
    cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
    if column_of is None:
      if cells[:3] == [header for _, header in COLUMNS[:3]]:
        column_of = {key: next(i for i, cell in enumerate(cells)
                               if cell == header or cell.startswith(header + ' ('))
                     for key, header in COLUMNS}
      continue
    if all(set(cell) == {'-'} for cell in cells) or len(cells) <= max(column_of.values()):
      continue
    row = {key: cells[i] for key, i in column_of.items()}
    rows[(row['section'], row['claim'])] = row
  return rows
