"""Trains the paper's MLP (or a CNN) on label-noised MNIST with SGD, winsorized SGD or another
aggregator of per-example gradients.

  python run.py --flagfile=flags/label_noise.cfg --noise=0.25 --logdir=runs/noise25
  python run.py --flagfile=flags/winsorized.cfg --noise=0.5 --winsor_c=4 --logdir=runs/w4

A rerun with the same --logdir resumes from its last checkpoint. Bad input
exits with status 2 and one line on stderr.
"""

import contextlib
import logging
import os
import sys
from typing import Tuple

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

# cg_tf.config loads no TensorFlow: its fields define the flags, one per setting.
from cg_tf import config as config_lib  # pylint: disable=g-import-not-at-top


def define_setting_flags() -> None:
  """One flag per Config field: its name, type, default, choices and help."""
  for name, kind, default, help_text, _, choices in config_lib.Config.settings():
    if choices is not None:
      flags.DEFINE_enum(name, default, list(choices), help_text)
    elif kind is bool:
      flags.DEFINE_bool(name, default, help_text)
    elif kind is int:
      flags.DEFINE_integer(name, default, help_text)
    elif kind is float:
      flags.DEFINE_float(name, default, help_text)
    elif kind == Tuple[int, ...]:
      flags.DEFINE_list(name, [str(v) for v in default], help_text)
    else:
      flags.DEFINE_string(name, default, help_text)


define_setting_flags()
flags.DEFINE_enum('strategy', 'default', ['default', 'mirrored', 'tpu', 'multiworker'],
                  "Hardware: 'default' one device; 'mirrored' all local GPUs (or "
                  "--cpu_replicas logical CPUs); 'tpu' a Cloud TPU (--tpu); 'multiworker' "
                  'several machines from TF_CONFIG (docs/cloud.md).')
flags.DEFINE_integer('cpu_replicas', 0, 'With --strategy=mirrored: this many logical CPU '
                     'devices as replicas (testing without GPUs); 0 = the GPUs.', lower_bound=0)
flags.DEFINE_string('tpu', 'local', "With --strategy=tpu: 'local' on a TPU VM, or the TPU's "
                    'name or grpc:// address.')
flags.DEFINE_string('logdir', None, 'Run directory: TensorBoard events, checkpoints, '
                    'examples.npz, config.json, flags.txt, final_metrics.json. Default: '
                    'runs/<dataset>_<hidden>_n<noise>_c<winsor_c>_s<seed>.')

FLAGS = flags.FLAGS


def fail(message: str) -> None:
  print(f'run.py: error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, but a bad flag is one line and exit status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(str(e))


def default_logdir() -> str:
  """runs/<the settings that tell runs apart>, e.g. runs/mnist_2048_n0.5_c4_s0."""
  parts = [FLAGS.dataset, 'cnn' if FLAGS.model == 'cnn' else 'x'.join(FLAGS.hidden)]
  if FLAGS.train_size:
    parts.append(f'{FLAGS.train_size}ex')
  parts += [f'n{FLAGS.noise:g}', f'c{FLAGS.winsor_c:g}', f's{FLAGS.seed}']
  if FLAGS.noise_seed != FLAGS.seed:
    parts.append(f'ns{FLAGS.noise_seed}')
  return os.path.join('runs', '_'.join(parts))


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; every setting is a --flag')
  if not FLAGS.logdir:
    FLAGS.logdir = default_logdir()
    print(f'run.py: writing to --logdir={FLAGS.logdir} (rerun the same command to resume; '
          'set --logdir to choose)', file=sys.stderr)
  # TensorFlow's own INFO lines (e.g. one per checkpoint shard, through absl or
  # its 'tensorflow' logger) would bury the progress lines; warnings still show.
  for name in ('absl', 'tensorflow'):
    logging.getLogger(name).setLevel(logging.WARNING)
  # TensorFlow is imported only once the flags, the run directory and the data
  # are known to be good, so that bad input fails fast and in one line.
  from cg_tf import data  # pylint: disable=g-import-not-at-top
  from cg_tf import workdir  # pylint: disable=g-import-not-at-top
  from cg_tf.errors import RunInterrupted  # pylint: disable=g-import-not-at-top
  from cg_tf.errors import TrainingDiverged  # pylint: disable=g-import-not-at-top
  from cg_tf.errors import UserInputError  # pylint: disable=g-import-not-at-top
  from cg_tf.errors import WriteFailed  # pylint: disable=g-import-not-at-top
  try:
    hidden = tuple(int(h) for h in FLAGS.hidden)
  except ValueError:
    fail(f'--hidden={",".join(FLAGS.hidden)} must be comma-separated integers')
  try:
    config = config_lib.Config(**{
        name: hidden if name == 'hidden' else FLAGS[name].value
        for name, *_ in config_lib.Config.settings()})

    run_dir = contextlib.ExitStack()

    def take_logdir():
      """Checks and takes the run directory: its settings, then its lock (one writer)."""
      workdir.prepare(FLAGS.logdir, config)
      run_dir.enter_context(workdir.exclusive(FLAGS.logdir))
      own_flags = FLAGS.get_key_flags_for_module(sys.modules[__name__])
      path = os.path.join(FLAGS.logdir, workdir.FLAGS_FILE)
      text = ''.join(f.serialize() + '\n' for f in own_flags).encode()
      if not os.path.exists(path) or workdir.read_bytes(path) != text:
        workdir.write_atomic(path, text)

    problem = workdir.damaged_record(FLAGS.logdir) if os.path.isdir(FLAGS.logdir) else None
    if problem:
      fail(problem)
    if workdir.finished_run(FLAGS.logdir, config):
      # Nothing is written into a finished run.
      print(f'run.py: the run in --logdir={FLAGS.logdir} is already complete '
            f'({workdir.FINAL_METRICS_FILE}); nothing to do', file=sys.stderr)
      return
    with run_dir:
      # Only the chief of several workers takes the run directory; which task
      # is the chief is known once the strategy exists.
      multiworker = FLAGS.strategy == 'multiworker'
      if not multiworker:
        take_logdir()
      # IDX files are read without TensorFlow, so bad data fails before it
      # loads. tfds runs TensorFlow, so it waits for the strategy: logical CPU
      # devices can only be set up before TensorFlow runs anything.
      by_tfds = data.uses_tfds(config.dataset, config.data_dir)
      dataset = None if by_tfds else data.load(config.dataset, config.data_dir)
      from cg_tf import distribute  # pylint: disable=g-import-not-at-top
      strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.cpu_replicas, FLAGS.tpu)
      if multiworker and distribute.is_chief(strategy):
        take_logdir()
      if by_tfds:
        dataset = data.load(config.dataset, config.data_dir)
      from cg_tf import train  # pylint: disable=g-import-not-at-top
      train.train_and_evaluate(config, FLAGS.logdir, dataset, strategy)
  except UserInputError as e:
    fail(str(e))
  except (TrainingDiverged, WriteFailed) as e:
    print(f'run.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  except RunInterrupted as e:
    print(f'run.py: {e}', file=sys.stderr)
    sys.exit(128 + e.signum)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
