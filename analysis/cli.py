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


def parse_flags(argv):
  """absl's parser for app.run, but a bad flag is one line and exit status 2.

  Also keeps TensorBoard's and TensorFlow's INFO lines (one per event file
  read) out of the scripts' output, which is their tables.
  """
  try:
    parsed = flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  for name in ('absl', 'tensorboard', 'tensorflow'):
    logging.getLogger(name).setLevel(logging.WARNING)
  return parsed


def finished_runs(patterns):
  """The finished run directories that --runs names; a bad --runs is one line, exit 2."""
  if not patterns:
    fail('--runs is required: run directories or glob patterns')
  try:
    return workdir.finished_runs(patterns)
  except UserInputError as e:
    fail(str(e))


def print_report(text: str, path=None) -> None:
  """Prints a script's markdown table and, with --report=PATH, writes it there too."""
  print(text)
  if path:
    with open(path, 'w') as f:
      f.write(text)
