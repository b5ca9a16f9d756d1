"""The paper's claims as small checks on measured curves.

Each check takes plain arrays or pandas Series (curves indexed by step) and
returns a `Verdict`: the measured quantity in words and numbers, and whether
it supports the claim. `reproduce.py` applies them to run directories;
tests/test_claims.py feeds each one a synthetic curve that passes and one
that fails.
"""

import dataclasses
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import pandas as pd


@dataclasses.dataclass(frozen=True)
class Verdict:
  """What was measured, and whether it supports the claim (None: its runs are not finished).

  `caveat` qualifies a verdict that the numbers alone would overstate, e.g. a
  bound met only because the network stopped learning.
  """
  measured: str
  passed: Optional[bool]
  caveat: str = ''

  @property
  def text(self) -> str:
    """PASS, FAIL or NOT RUN, with the caveat in brackets."""
    word = 'NOT RUN' if self.passed is None else 'PASS' if self.passed else 'FAIL'
    return f'{word} ({self.caveat})' if self.caveat else word


def not_run(missing: Sequence[str]) -> Verdict:
  """The verdict of a check whose runs `missing` have not finished."""
  return Verdict(f'waiting for {", ".join(missing)}', None)


def first_step_reaching(curve: pd.Series, level: float) -> Optional[int]:
  """First step at which curve >= level; None if never."""
  reached = curve[curve >= level]
  return None if reached.empty else int(reached.index[0])


def time_to_accuracy_grows_with_noise(train_accuracy: Mapping[float, pd.Series],
                                      level: float = 0.9) -> Verdict:
  """§2.3 (1): the step at which training accuracy first reaches `level` grows with noise."""
  steps = {noise: first_step_reaching(curve, level) for noise, curve in
           sorted(train_accuracy.items())}
  values = [np.inf if s is None else s for s in steps.values()]
  text = ', '.join(f'{n:.0%}: {s}' for n, s in steps.items())
  return Verdict(f'step to {level:.0%} train acc: {text}',
                 all(a <= b for a, b in zip(values, values[1:])))


def pristine_learned_first(first_learned_step: np.ndarray, corrupt: np.ndarray) -> Verdict:
  """§2.3 (2): pristine examples are learned before corrupt ones (median first step)."""
  never = np.iinfo(np.int64).max
  steps = np.where(first_learned_step < 0, never, first_learned_step)
  pristine, corrupted = np.median(steps[~corrupt]), np.median(steps[corrupt])
  return Verdict(f'median first-learned step: pristine {pristine:g}, corrupt {corrupted:g}',
                 bool(pristine < corrupted))


def fewer_pristine_learned_slower(clean_pristine_accuracy: pd.Series,
                                  noisy_pristine_accuracy: pd.Series,
                                  steps: Sequence[int] = tuple(range(1, 11))) -> Verdict:
  """§2.3 (3): with fewer pristine examples they are learned more slowly (first steps)."""
  clean = float(clean_pristine_accuracy.reindex(steps).mean())
  noisy = float(noisy_pristine_accuracy.reindex(steps).mean())
  return Verdict(f'mean pristine accuracy over steps {steps[0]}-{steps[-1]}: '
                 f'{clean:.3f} clean vs {noisy:.3f} noisy', clean > noisy)


def all_fit(final_train_accuracy: Mapping[float, float], level: float = 0.99) -> Verdict:
  """§2.3: every noise level ends with (nearly) 100% training accuracy."""
  text = ', '.join(f'{n:.0%}: {a:.4f}' for n, a in sorted(final_train_accuracy.items()))
  return Verdict(f'final train acc {text}', all(a >= level for a in
                                                final_train_accuracy.values()))


def crosses(f_pristine: np.ndarray, f_corrupt: np.ndarray) -> Optional[int]:
  """Index of the first measurement with f^p < f^c after starting with f^p > f^c."""
  if not f_pristine[0] > f_corrupt[0]:
    return None
  below = np.nonzero(f_pristine < f_corrupt)[0]
  return None if below.size == 0 else int(below[0])


def pristine_dominates_then_crosses(steps: np.ndarray, f: np.ndarray) -> Verdict:
  """§2.4: f^p starts above f^c and they cross. f: [T, 2] (f^p, f^c) at `steps`."""
  index = crosses(f[:, 0], f[:, 1])
  where = 'never' if index is None else f'at step {int(steps[index])}'
  return Verdict(f'f^p(0) = {f[0, 0]:.3f}, f^c(0) = {f[0, 1]:.3f}; crossing {where}',
                 index is not None)


def nulls_do_not_cross(f_nulls: np.ndarray) -> Verdict:
  """§2.4: in null worlds f^p and f^c do not cross. f_nulls: [T, K, 2]."""
  crossings = [crosses(f_nulls[:, k, 0], f_nulls[:, k, 1]) for k in range(f_nulls.shape[1])]
  count = sum(c is not None for c in crossings)
  return Verdict(f'{count} of {len(crossings)} null worlds start with f^p > f^c and cross',
                 count == 0)


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
  run that learned nothing (see `learned_nothing`) is marked: it keeps below
  the bound trivially. With every label random, learning nothing is the claim.
  """
  text = f'final train acc {final_train_accuracy:.3f} vs proper {proper:.3f}'
  caveat = ''
  if (final_test_accuracy is not None and proper > 0.1 + 1e-9 and
      learned_nothing(final_test_accuracy)):
    text += f', final test acc {final_test_accuracy:.3f}'
    caveat = 'trivially: the network learned nothing'
  return Verdict(text, final_train_accuracy <= proper + tolerance, caveat)


def overfit_falls_with_c(final_overfit: Mapping[float, float]) -> Verdict:
  """§3.3: the overfit reached grows more slowly as c grows (final overfit falls with c)."""
  values = [final_overfit[c] for c in sorted(final_overfit)]
  text = ', '.join(f'c={c:g}: {final_overfit[c]:.3f}' for c in sorted(final_overfit))
  return Verdict(f'final overfit {text}', all(a >= b for a, b in zip(values, values[1:])))


def early_stopping_helps(test_accuracy: pd.Series, margin: float = 0.01) -> Verdict:
  """§2.3: the best test accuracy during training beats the final one."""
  best, final = float(test_accuracy.max()), float(test_accuracy.iloc[-1])
  return Verdict(f'best test acc {best:.3f} (step {int(test_accuracy.idxmax())}) vs final '
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

  Rows need the default COLUMNS; lines that are not rows of that table are ignored.
  """
  keys = [key for key, _ in COLUMNS]
  rows = {}
  for line in text.splitlines():
    cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
    if not line.startswith('|') or len(cells) != len(keys) or cells[0] in ('§', '---'):
      continue
    row = dict(zip(keys, cells))
    rows[(row['section'], row['claim'])] = row
  return rows
