"""The run directory: creating it, refusing to mix two runs in one, reading it back."""

import dataclasses
import json
import os
from typing import Dict, Optional

import numpy as np

from cg_tf.config import Config
from cg_tf.errors import UserInputError

CONFIG_FILE = 'config.json'
EXAMPLES_FILE = 'examples.npz'
DECOMPOSITION_FILE = 'decomposition.npz'
# Written once the last step is evaluated and checkpointed: its presence with
# that step is what "the run is finished" means to reproduce.py.
FINAL_METRICS_FILE = 'final_metrics.json'
# Fields that may differ when a run is resumed: they do not change its numbers
# (steps only extends or shortens it).
RESUMABLE_CHANGES = ('steps', 'data_dir', 'eval_batch_size')


def prepare(workdir: str, config: Config) -> None:
  """Creates `workdir`, or checks that the run already in it has the same config.

  Raises:
    UserInputError: the directory is not writable, or holds a different run.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write_test')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserInputError(f'--logdir={workdir} is not writable ({e.strerror}); choose '
                         'another --logdir') from None
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    current = dataclasses.asdict(config)
    changed = sorted(k for k in current
                     if k not in RESUMABLE_CHANGES and json.loads(json.dumps(current[k]))
                     != previous.get(k))
    if changed:
      detail = ', '.join(f'{k}={previous.get(k)!r} there vs {current[k]!r} now' for k in changed)
      raise UserInputError(f'--logdir={workdir} holds a run with other settings ({detail}); '
                           'use a new --logdir to start a new run')
  write_atomic(path, config.to_json().encode())


def write_atomic(path: str, payload: bytes) -> None:
  """Writes via a temporary file and a rename, so a kill never leaves half a file."""
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(payload)
  os.replace(tmp, path)


def _save_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
  tmp = path + '.tmp.npz'
  # Compressed: per-example records are mostly -1s and small integers, and
  # finished runs' records are kept in git (results/).
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def save_examples(workdir: str, record: Dict[str, np.ndarray]) -> None:
  """Writes examples.npz (one array per key, one entry per training example) atomically."""
  _save_npz(os.path.join(workdir, EXAMPLES_FILE), record)


def save_decomposition(workdir: str, arrays: Dict[str, np.ndarray]) -> None:
  """Writes decomposition.npz (decomposition.Recorder's records) atomically."""
  _save_npz(os.path.join(workdir, DECOMPOSITION_FILE), arrays)


def read_decomposition(workdir: str) -> Optional[Dict[str, np.ndarray]]:
  """decomposition.npz as a dict, or None if the run has none."""
  path = os.path.join(workdir, DECOMPOSITION_FILE)
  if not os.path.exists(path):
    return None
  with np.load(path) as record:
    return {key: record[key] for key in record.files}


def save_final_metrics(workdir: str, step: int, metrics: Dict[str, float]) -> None:
  """Writes final_metrics.json: {'step': step, 'metrics': {name: value}}."""
  write_atomic(os.path.join(workdir, FINAL_METRICS_FILE),
               json.dumps({'step': step, 'metrics': metrics}, indent=2, sort_keys=True).encode())


def is_finished(workdir: str) -> bool:
  """True if the run in `workdir` has reached and recorded the last step of its config."""
  try:
    with open(os.path.join(workdir, FINAL_METRICS_FILE)) as f:
      final_step = json.load(f)['step']
    return final_step == read_config(workdir).steps
  except (OSError, ValueError, KeyError, TypeError):
    return False


def read_config(workdir: str) -> Config:
  """The Config a run directory was made with."""
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    return Config.from_json(f.read())


def read_examples(workdir: str) -> Dict[str, np.ndarray]:
  """examples.npz as a dict of [n_train] arrays."""
  with np.load(os.path.join(workdir, EXAMPLES_FILE)) as record:
    return {key: record[key] for key in record.files}


def read_scalars(workdir: str):
  """Every scalar summary of a run as a pandas DataFrame indexed by step, one column a tag.

  Reads the event files with tbparse. A resumed run rewrites the steps between
  its last checkpoint and the kill; the last value written wins.
  """
  from tbparse import SummaryReader  # pylint: disable=g-import-not-at-top
  frame = SummaryReader(workdir).tensors
  if frame.empty:
    raise UserInputError(f'{workdir} has no scalar summaries; is it a run directory?')
  frame = frame.drop_duplicates(['tag', 'step'], keep='last')
  return frame.pivot(index='step', columns='tag', values='value').sort_index()
