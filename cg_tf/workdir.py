"""The run directory: creating it, refusing to mix two runs in one, reading it back.

Every file goes through `files(path)`: TensorFlow's tf.io.gfile for a URL
(gs://bucket/run, or ram:// in the tests), Python's own functions for a local
path, so that a bad local --logdir is reported before TensorFlow loads.
"""

import contextlib
import dataclasses
import glob
import io
import json
import logging
import os
import socket
import types
from typing import Callable, Dict, Iterator, Optional

import numpy as np

from cg_tf.config import Config
from cg_tf.errors import UserInputError

CONFIG_FILE = 'config.json'
EXAMPLES_FILE = 'examples.npz'
DECOMPOSITION_FILE = 'decomposition.npz'
COHERENCE_FILE = 'coherence.npz'
# Written once the last step is evaluated and checkpointed: its presence with
# that step is what "the run is finished" means to reproduce.py.
FINAL_METRICS_FILE = 'final_metrics.json'
# Held by the one process that writes the run: {"host": ..., "pid": ...}.
LOCK_FILE = 'lock.json'
# run.py's flags, one --name=value a line, for reading by people.
FLAGS_FILE = 'flags.txt'
# What each record file is, and the way out when it is damaged.
_RECORDS = {
    CONFIG_FILE: "it holds the run's settings: restore it from a copy, or start the run over "
                 'in a new --logdir',
    FINAL_METRICS_FILE: 'delete it and rerun the same command: the run writes it again from its '
                        'last checkpoint',
    EXAMPLES_FILE: 'delete it and rerun the same command: the run writes it again at its next '
                   'evaluation, from its last checkpoint',
    DECOMPOSITION_FILE: 'restore it from a copy; deleting it loses the measurements made so far '
                        '(a new --logdir makes them again from step 0)',
    COHERENCE_FILE: 'restore it from a copy; deleting it loses the measurements made so far '
                    '(a new --logdir makes them again from step 0)',
    FLAGS_FILE: 'delete it: the next run of the same command writes it again',
}

log = logging.getLogger('cg_tf')
# Fields that may differ when a run is resumed: they do not change its numbers
# (steps only extends or shortens it).
RESUMABLE_CHANGES = ('steps', 'data_dir', 'eval_batch_size')


LOCAL_FILES = types.SimpleNamespace(
    exists=os.path.exists, isdir=os.path.isdir, glob=glob.glob, remove=os.remove,
    makedirs=lambda path: os.makedirs(path, exist_ok=True), GFile=open,
    rename=lambda source, target, overwrite: os.replace(source, target),
    errors=(OSError,))


def files(path: str):
  """The file functions for `path`: tf.io.gfile's names (exists, makedirs, GFile, rename, ...)."""
  if '://' not in path:
    return LOCAL_FILES
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return types.SimpleNamespace(
      exists=tf.io.gfile.exists, isdir=tf.io.gfile.isdir, glob=tf.io.gfile.glob,
      remove=tf.io.gfile.remove, makedirs=tf.io.gfile.makedirs, GFile=tf.io.gfile.GFile,
      rename=tf.io.gfile.rename, errors=(OSError, tf.errors.OpError))


def read_bytes(path: str) -> bytes:
  with files(path).GFile(path, 'rb') as f:
    return f.read()


def prepare(workdir: str, config: Config) -> bool:
  """Creates `workdir`, or checks that the run already in it has the same config.

  A finished run of the same config is left as it is: nothing is written.

  Returns:
    True if the directory holds that run, finished.

  Raises:
    UserInputError: the directory is not writable, holds a different run, or
      a record file of the run is damaged (damaged_record).
  """
  fs = files(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  text = config.to_json().encode()
  if fs.exists(workdir):
    problem = damaged_record(workdir)
    if problem:
      raise UserInputError(problem)
    if finished_run(workdir, config):
      return True
  try:
    fs.makedirs(workdir)
    probe = os.path.join(workdir, '.write_test')
    with fs.GFile(probe, 'w') as f:
      f.write('ok')
    fs.remove(probe)
  except fs.errors as e:
    reason = getattr(e, 'strerror', None) or getattr(e, 'message', None) or type(e).__name__
    raise UserInputError(f'--logdir={workdir} is not writable ({reason}); choose '
                         'another --logdir') from None
  if fs.exists(path):
    written = read_bytes(path)
    if written == text:
      return False
    # A setting added after the run started has its default there.
    previous = {**json.loads(Config().to_json()), **json.loads(written)}
    current = dataclasses.asdict(config)
    changed = sorted(k for k in current
                     if k not in RESUMABLE_CHANGES and json.loads(json.dumps(current[k]))
                     != previous.get(k))
    if changed:
      detail = ', '.join(f'{k}={previous.get(k)!r} there vs {current[k]!r} now' for k in changed)
      raise UserInputError(f'--logdir={workdir} holds a run with other settings ({detail}); '
                           'use a new --logdir to start a new run')
  write_atomic(path, text)
  return False


def finished_run(workdir: str, config: Config) -> bool:
  """True if `workdir` holds the run of exactly `config`, finished (reads only)."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    return read_bytes(path) == config.to_json().encode() and is_finished(workdir)
  except files(path).errors:
    return False


def read_final_metrics(workdir: str) -> Dict[str, float]:
  """The metrics of final_metrics.json."""
  return json.loads(read_bytes(os.path.join(workdir, FINAL_METRICS_FILE)))['metrics']


def _check_json(payload: bytes, required) -> None:
  value = json.loads(payload)
  if not isinstance(value, dict) or not set(required) <= set(value):
    raise ValueError(f'it lacks {", ".join(sorted(set(required) - set(value or {})))}'
                     if isinstance(value, dict) else 'it is not a JSON object')


def _check_npz(payload: bytes) -> None:
  with np.load(io.BytesIO(payload)) as record:
    for key in record.files:
      record[key]  # pylint: disable=pointless-statement  (reads and checks every array)


def _check_flags(payload: bytes) -> None:
  for line in payload.decode('utf-8').splitlines():
    if line and not line.startswith('--'):
      raise ValueError(f'the line {line[:40]!r} is not a --flag')


def damaged_record(workdir: str) -> Optional[str]:
  """What is wrong with the first damaged record file of a run directory, in one line, or None.

  Each of config.json, final_metrics.json, examples.npz, decomposition.npz,
  coherence.npz and flags.txt that exists must read back whole (a truncated
  copy, or other bytes, does not); the line names the file, what is wrong and
  the way out.
  """
  checks = {CONFIG_FILE: lambda b: _check_json(b, ('steps',)),
            FINAL_METRICS_FILE: lambda b: _check_json(b, ('step', 'metrics')),
            EXAMPLES_FILE: _check_npz, DECOMPOSITION_FILE: _check_npz, COHERENCE_FILE: _check_npz,
            FLAGS_FILE: _check_flags}
  for name, check in checks.items():
    path = os.path.join(workdir, name)
    fs = files(path)
    if not fs.exists(path):
      continue
    try:
      check(read_bytes(path))
    except Exception as e:  # pylint: disable=broad-except  (any failure to read back is damage)
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      return f'{path} is damaged ({reason}); {_RECORDS[name]}'
  return None


def _lock_holder(path: str) -> Optional[Dict[str, object]]:
  try:
    return json.loads(read_bytes(path))
  except files(path).errors + (ValueError,):
    return None


def _is_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def exclusive(workdir: str) -> Iterator[None]:
  """Holds the run directory's lock for the duration: one writer per run.

  A lock left by a process that is no longer running on this host is taken
  over, with a log line. On a local disk the lock is created atomically
  (O_EXCL); on a URL it is written, then read back.

  Raises:
    UserInputError: another live process holds the lock.
  """
  path = os.path.join(workdir, LOCK_FILE)
  me = {'host': socket.gethostname(), 'pid': os.getpid()}
  for _ in range(2):
    holder = _lock_holder(path)
    if holder is not None:
      if holder.get('host') != me['host'] or _is_running(int(holder.get('pid', -1))):
        raise UserInputError(
            f'--logdir={workdir} is in use by pid {holder.get("pid")} on '
            f'{holder.get("host")} (see {path}); wait for that run to end, or use another '
            '--logdir')
      log.info('taking over %s from pid %s, which is no longer running', path,
               holder.get('pid'))
      files(path).remove(path)
    payload = json.dumps(me).encode()
    if '://' in path:
      write_atomic(path, payload)
    else:
      try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        continue  # another launch got there first: look at who holds it
      with os.fdopen(descriptor, 'wb') as f:
        f.write(payload)
    if _lock_holder(path) == me:
      break
  else:
    raise UserInputError(f'--logdir={workdir}: another launch is taking {path}; use one '
                         '--logdir per run')
  try:
    yield
  finally:
    if _lock_holder(path) == me:
      files(path).remove(path)


def write_atomic(path: str, payload: bytes) -> None:
  """Writes via a temporary file and a rename, so a kill never leaves half a file."""
  fs, tmp = files(path), path + '.tmp'
  with fs.GFile(tmp, 'wb') as f:
    f.write(payload)
  fs.rename(tmp, path, overwrite=True)


def _save_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
  buffer = io.BytesIO()
  # Compressed: per-example records are mostly -1s and small integers, and
  # finished runs' records are kept in git (results/).
  np.savez_compressed(buffer, **arrays)
  write_atomic(path, buffer.getvalue())


def _read_npz(path: str) -> Dict[str, np.ndarray]:
  with np.load(io.BytesIO(read_bytes(path))) as record:
    return {key: record[key] for key in record.files}


def save_examples(workdir: str, record: Dict[str, np.ndarray]) -> None:
  """Writes examples.npz (one array per key, one entry per training example) atomically."""
  _save_npz(os.path.join(workdir, EXAMPLES_FILE), record)


def save_measurements(workdir: str, filename: str, arrays: Dict[str, np.ndarray]) -> None:
  """Writes a Recorder's records (DECOMPOSITION_FILE, COHERENCE_FILE) atomically."""
  _save_npz(os.path.join(workdir, filename), arrays)


def read_measurements(workdir: str, filename: str) -> Optional[Dict[str, np.ndarray]]:
  """A Recorder's records (DECOMPOSITION_FILE, COHERENCE_FILE) as a dict, or None if absent."""
  path = os.path.join(workdir, filename)
  if not files(path).exists(path):
    return None
  return _read_npz(path)


def save_final_metrics(workdir: str, step: int, metrics: Dict[str, float]) -> None:
  """Writes final_metrics.json: {'step': step, 'metrics': {name: value}}."""
  write_atomic(os.path.join(workdir, FINAL_METRICS_FILE),
               json.dumps({'step': step, 'metrics': metrics}, indent=2, sort_keys=True).encode())


def is_finished(workdir: str) -> bool:
  """True if the run in `workdir` has reached and recorded the last step of its config."""
  try:
    final_step = json.loads(read_bytes(os.path.join(workdir, FINAL_METRICS_FILE)))['step']
    # The JSON itself, not a Config: a run written by another version of cg_tf
    # is finished all the same.
    return final_step == json.loads(read_bytes(os.path.join(workdir, CONFIG_FILE)))['steps']
  except files(workdir).errors + (ValueError, KeyError, TypeError):
    return False


def not_finished(run_dir: str) -> Optional[str]:
  """What keeps `run_dir` from being read as a finished run, or None."""
  if is_finished(run_dir):
    return None
  return (f'{run_dir} has not finished (no {FINAL_METRICS_FILE} for its last step); rerun its '
          'command to finish it, or leave it out')


def run_directories(patterns, problem: Callable[[str], Optional[str]] = not_finished) -> list:
  """The run directories that `patterns` (paths or glob patterns) name, in order.

  Args:
    patterns: paths or glob patterns, local or cloud.
    problem: what is wrong with a run directory for the caller, or None;
      by default, that it has not finished.

  Raises:
    UserInputError: a pattern matches nothing, a match is not a run
      directory or holds the config of another version of cg_tf, or `problem`
      names what is wrong with it.
  """
  run_dirs = []
  for pattern in patterns:
    matches = sorted(files(pattern).glob(pattern))
    if not matches:
      raise UserInputError(f'--runs: {pattern} matches no directory')
    for run_dir in matches:
      if not files(run_dir).exists(os.path.join(run_dir, CONFIG_FILE)):
        raise UserInputError(f'--runs: {run_dir} is not a run directory (no {CONFIG_FILE})')
      damage = damaged_record(run_dir)
      if damage:
        raise UserInputError(f'--runs: {damage}')
      try:
        read_config(run_dir)
      except UserInputError as e:
        raise UserInputError(f'--runs: {run_dir}: {e}') from None
      wrong = problem(run_dir)
      if wrong:
        raise UserInputError(f'--runs: {wrong}')
      run_dirs.append(run_dir)
  return run_dirs


def read_config(workdir: str) -> Config:
  """The Config a run directory was made with."""
  return Config.from_json(read_bytes(os.path.join(workdir, CONFIG_FILE)).decode())


def read_examples(workdir: str) -> Dict[str, np.ndarray]:
  """examples.npz as a dict of [n_train] arrays."""
  return _read_npz(os.path.join(workdir, EXAMPLES_FILE))


def read_scalars(workdir: str):
  """Every scalar summary of a run as a pandas DataFrame indexed by step, one column a tag.

  Reads the event files with TensorBoard's own reader (EventAccumulator),
  which goes through tf.io.gfile, so gs:// run directories read too. A resumed
  run rewrites the steps between its last checkpoint and the kill; the reader
  keeps the last value written, as TensorBoard shows it.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  if not files(workdir).isdir(workdir):
    raise UserInputError(f'{workdir} is not a directory; pass a run directory')
  accumulator = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  columns = {}
  for tag in accumulator.Tags()[event_accumulator.TENSORS]:
    events = accumulator.Tensors(tag)
    proto = events[0].tensor_proto if events else None
    if proto is not None and not proto.tensor_shape.dim and tf.as_dtype(proto.dtype).is_floating:
      by_step = {event.step: float(tf.make_ndarray(event.tensor_proto)) for event in events}
      columns[tag] = pd.Series(by_step, dtype=float)
  if not columns:
    raise UserInputError(f'{workdir} has no scalar summaries; is it a run directory?')
  frame = pd.DataFrame(columns).sort_index()
  frame.index.name = 'step'
  return frame
