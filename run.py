"""Trains an MLP on (label-noised) MNIST with SGD or winsorized SGD.

  python run.py --flagfile=flags/label_noise.cfg --noise=0.25 --logdir=runs/noise25
  python run.py --flagfile=flags/winsorized.cfg --noise=0.5 --winsor_c=4 --logdir=runs/w4

A rerun with the same --logdir resumes from its last checkpoint. Bad input
exits with status 2 and one line on stderr.
"""

import contextlib
import logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

# cg_tf.config loads no TensorFlow: its names can define the flags.
from cg_tf.config import AGGREGATORS  # pylint: disable=g-import-not-at-top
from cg_tf.config import WINSOR_IMPLS  # pylint: disable=g-import-not-at-top

flags.DEFINE_enum('dataset', 'mnist', ['mnist', 'fashion_mnist'],
                  'Dataset, used when --data_dir is not given (fashion_mnist through tfds).')
flags.DEFINE_string('data_dir', None, 'Directory with the four IDX files. If unset, MNIST '
                    'is read from the copy shipped with cg_tf, other datasets through tfds.')
flags.DEFINE_integer('train_size', 0, 'Train on a fixed random subset of this many '
                     'training examples (0: all).')
flags.DEFINE_float('noise', 0.0, 'Fraction of training labels randomly permuted (§2.1).')
flags.DEFINE_integer('noise_seed', 0, 'Seed of the label noise and the training subset.')
flags.DEFINE_integer('seed', 0, 'Seed of the initialisation and the minibatch order.')
flags.DEFINE_list('hidden', ['2048'], 'Hidden layer widths, e.g. 2048 or 256,256,256.')
flags.DEFINE_enum('init', 'paper', ['paper', 'glorot_uniform'],
                  "'paper': N(0,1)*2/sqrt(fan_in+fan_out), as the authors' code.")
flags.DEFINE_float('learning_rate', 0.1, 'Constant SGD learning rate.')
flags.DEFINE_integer('batch_size', 100, 'Minibatch size; 0 for full-batch gradient descent.')
flags.DEFINE_integer('steps', 100_000, 'Number of training steps.')
flags.DEFINE_integer('eval_every', 10_000, 'Evaluate every this many steps, besides '
                     'the log-spaced steps 0-9, 10-90, 100-900, 1000-9000.')
flags.DEFINE_integer('checkpoint_every', 5_000, 'Checkpoint every this many steps.')
flags.DEFINE_float('winsor_c', 0.0, 'Winsorize per-example gradients at the c-th and '
                   '(100-c)-th percentile of the minibatch (§3); 0 is plain SGD.')
flags.DEFINE_enum('winsor_impl', 'fast', list(WINSOR_IMPLS),
                  "How winsorize, trimmed_mean and median sort: 'fast', exact, by the compiled "
                  'CPU kernel on CPUs (built once per machine with g++) and by XLA elsewhere, '
                  "the same numbers; 'xla' or 'cpu_kernel': one of those two; 'reference' "
                  '(winsorize): vectorized_map and tfp.stats.percentile (slow, the definition).')
flags.DEFINE_bool('deterministic', False, 'Enable TensorFlow op determinism (GPU).')
flags.DEFINE_integer('eval_batch_size', 10_000, 'Examples per evaluation forward pass.')
flags.DEFINE_integer('decomp_every', 0, 'Measure the §2.4 pristine/corrupt decomposition '
                     'every this many steps (0: off).')
flags.DEFINE_integer('decomp_dense_steps', 10, '...and at every step up to this one.')
flags.DEFINE_integer('null_worlds', 3, 'Null worlds (permuted designations) for §2.4.')
flags.DEFINE_integer('decomp_sample_examples', 400, 'Examples in the sampled estimator.')
flags.DEFINE_integer('decomp_sample_weights', 300, 'Weights per layer in the sampled estimator.')
flags.DEFINE_integer('coherence_every', 0, 'Measure m-coherence, per-example coherence and '
                     'GSNR over the whole training set every this many steps, and at the '
                     "decomposition's dense and log-spaced steps (0: off).")
flags.DEFINE_integer('stiffness_examples', 0, '...and the 10x10 class stiffness matrix on a '
                     'fixed sample of this many training examples (0: off).')
flags.DEFINE_bool('forgetting', False, "Count each example's forgetting events (correct at "
                  'its previous minibatch presentation, wrong at this one) into examples.npz.')
flags.DEFINE_enum('aggregator', 'winsorize', list(AGGREGATORS),
                  'How per-example gradients become the update (docs/aggregators.md); '
                  "'winsorize' with --winsor_c=0 is plain SGD.")
flags.DEFINE_integer('trim_k', 0, 'trimmed_mean: values dropped a side per coordinate.')
flags.DEFINE_float('clip_norm', 0.0, 'l2clip, dp: per-example gradient L2 norm bound C.')
flags.DEFINE_float('noise_multiplier', 0.0, 'dp: Gaussian noise N(0, (sigma C)^2) on the '
                   'clipped sum; sigma is this.')
flags.DEFINE_float('dp_delta', 1e-5, "dp: the delta of the (epsilon, delta) reported.")
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
  parts = [FLAGS.dataset, 'x'.join(FLAGS.hidden)]
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
  from cg_tf import config as config_lib  # pylint: disable=g-import-not-at-top
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
    config = config_lib.Config(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, train_size=FLAGS.train_size,
        noise=FLAGS.noise, noise_seed=FLAGS.noise_seed, seed=FLAGS.seed, hidden=hidden,
        init=FLAGS.init, learning_rate=FLAGS.learning_rate, batch_size=FLAGS.batch_size,
        steps=FLAGS.steps, eval_every=FLAGS.eval_every,
        checkpoint_every=FLAGS.checkpoint_every, winsor_c=FLAGS.winsor_c,
        winsor_impl=FLAGS.winsor_impl, deterministic=FLAGS.deterministic,
        eval_batch_size=FLAGS.eval_batch_size, decomp_every=FLAGS.decomp_every,
        decomp_dense_steps=FLAGS.decomp_dense_steps, null_worlds=FLAGS.null_worlds,
        decomp_sample_examples=FLAGS.decomp_sample_examples,
        decomp_sample_weights=FLAGS.decomp_sample_weights,
        coherence_every=FLAGS.coherence_every, stiffness_examples=FLAGS.stiffness_examples,
        forgetting=FLAGS.forgetting, aggregator=FLAGS.aggregator, trim_k=FLAGS.trim_k,
        clip_norm=FLAGS.clip_norm, noise_multiplier=FLAGS.noise_multiplier,
        dp_delta=FLAGS.dp_delta)

    run_dir = contextlib.ExitStack()

    def take_logdir():
      """Checks and takes the run directory: its settings, then its lock (one writer)."""
      workdir.prepare(FLAGS.logdir, config)
      run_dir.enter_context(workdir.exclusive(FLAGS.logdir))
      own_flags = FLAGS.get_key_flags_for_module(sys.modules[__name__])
      workdir.write_atomic(os.path.join(FLAGS.logdir, 'flags.txt'),
                           ''.join(f.serialize() + '\n' for f in own_flags).encode())

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
