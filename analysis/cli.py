"""What the analysis scripts share on the command line: one-line errors, exit status 2."""

import logging
import os
import sys

from absl import flags

from cg_tf import workdir
from cg_tf.errors import UserInputError


def fail(message: str) -> None:
  """Prints `<script>: error: message` on stderr and exits with status 2."""
  print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
  sys.exit(2)


# The flags that name what a script writes, {name: whether it is a directory}:
# parse_flags checks that they can be written before the script reads any run.
_OUTPUTS = {}


def define_output(name: str, default, help_text: str, directory: bool = False) -> None:
  """Defines a string flag naming a file (or, with `directory`, a directory) the script writes."""
  flags.DEFINE_string(name, default, help_text)
  _OUTPUTS[name] = directory


def unwritable(path: str, directory: bool):
  """Why `path` cannot be written (its directories are created if missing), or None."""
  place = os.path.abspath(path) if directory else os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(place, exist_ok=True)
  except OSError as e:
    return f'{place} cannot be created ({e.strerror})'
  if not directory and os.path.isdir(path):
    return 'it is a directory'
  if not os.access(path if os.path.exists(path) else place, os.W_OK):
    return f'{path if os.path.exists(path) else place} is not writable'
  return None


def parse_flags(argv):
  """absl's parser for app.run, but a bad flag is one line and exit status 2.

  Also checks that the outputs (define_output) can be written, and keeps
  TensorBoard's and TensorFlow's INFO lines (one per event file read) out of
  the scripts' output, which is their tables.
  """
  try:
    parsed = flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  for name, directory in _OUTPUTS.items():
    path = flags.FLAGS[name].value
    problem = path and unwritable(path, directory)
    if problem:
      fail(f'--{name}={path} cannot be written: {problem}; choose another path')
  for name in ('absl', 'tensorboard', 'tensorflow'):
    logging.getLogger(name).setLevel(logging.WARNING)
  return parsed


def run_directories(patterns, problem=workdir.not_finished):
  """The run directories that --runs names (finished ones, unless `problem` says otherwise).

  A bad --runs is one line and exit status 2; see workdir.run_directories.
  """
  if not patterns:
    fail('--runs is required: run directories or glob patterns')
  try:
    return workdir.run_directories(patterns, problem)
  except UserInputError as e:
    fail(str(e))


def print_report(text: str, path=None) -> None:
  """Prints a script's markdown table and, with --report=PATH, writes it there too."""
  print(text)
  if path:
    with open(path, 'w') as f:
      f.write(text)
