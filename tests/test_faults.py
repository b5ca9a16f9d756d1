"""What cloud machines do to runs: kills, preemption, a second launch, a failed write."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf

from cg_tf import train
from cg_tf import workdir as workdir_lib
from cg_tf.errors import WriteFailed
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Enough steps that 7 interrupted launches cannot reach the end on an idle
# machine (with 13 launches, 3,000 steps could: the last SIGTERM then landed
# after training).
FLAGS = ['--hidden=32', '--batch_size=50', '--eval_every=100', '--checkpoint_every=50',
         '--eval_batch_size=500', '--noise=0.5', '--steps=6000']
# Metrics that measure the machine, not the run.
TIMING = ('steps_per_second',)


def launch(data_dir, logdir):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, 'run.py'), *FLAGS,
                           f'--data_dir={data_dir}', f'--logdir={logdir}'], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def latest_step(logdir):
  path = tf.train.latest_checkpoint(os.path.join(logdir, 'checkpoints'))
  return -1 if path is None else int(path.rsplit('-', 1)[1])


def final_state(logdir):
  """(final metrics without timings, examples.npz, checkpointed weights) of a finished run."""
  with open(os.path.join(logdir, workdir_lib.FINAL_METRICS_FILE)) as f:
    final = json.load(f)
  metrics = {k: v for k, v in final['metrics'].items() if k not in TIMING}
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(logdir,
                                                                            'checkpoints')))
  weights = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
             if name.startswith('optimizer/_trainable_variables/')}
  return final['step'], metrics, workdir_lib.read_examples(logdir), weights


@pytest.mark.slow
class FaultTest(parameterized.TestCase, tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = fixtures.fake_mnist_dir('faults', num_train=500)

  def assert_same_final_state(self, expected_dir, got_dir):
    expected, got = final_state(expected_dir), final_state(got_dir)
    self.assertEqual(got[0], expected[0])
    self.assertEqual(got[1], expected[1])
    for key, value in expected[2].items():
      self.assertAllEqual(got[2][key], value, msg=key)
    for name, value in expected[3].items():
      self.assertAllEqual(got[3][name], value, msg=name)

  def test_survives_five_kills_and_two_preemptions(self):
    whole = self.create_tempdir().full_path
    self.assertEqual(launch(self.data_dir, whole).wait(timeout=600), 0)

    logdir = self.create_tempdir().full_path
    rng = np.random.default_rng(0)
    kills = terms = 0
    while kills < 5 or terms < 2:
      before = latest_step(logdir)
      process = launch(self.data_dir, logdir)
      deadline = time.time() + 300
      # Wait for progress past the last checkpoint, then strike at a random
      # moment: mid-step, mid-evaluation or mid-write.
      while latest_step(logdir) <= before and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
      time.sleep(rng.uniform(0.0, 0.15))
      self.assertIsNone(process.poll(), 'the run finished before it could be stopped: '
                        f'{kills} kills, {terms} SIGTERMs; give it more --steps')
      if kills < 5:
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
      else:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        self.assertEqual(process.returncode, 128 + signal.SIGTERM, stderr[-2000:])
        last = stderr.strip().splitlines()[-1]
        self.assertRegex(last, r'^run\.py: stopped by SIGTERM at step \d+; saved .*ckpt-\d+\. '
                         r'Rerun the same command to resume$')
        self.assertNotIn('Traceback', stderr)
        terms += 1
    finish = launch(self.data_dir, logdir)
    _, stderr = finish.communicate(timeout=600)
    self.assertEqual(finish.returncode, 0, stderr[-3000:])
    self.assertIn('resuming at step', stderr)
    self.assert_same_final_state(whole, logdir)

  def test_a_second_launch_is_refused_and_a_dead_holder_is_taken_over(self):
    logdir = self.create_tempdir().full_path
    first = launch(self.data_dir, logdir)
    lock = os.path.join(logdir, workdir_lib.LOCK_FILE)
    deadline = time.time() + 120
    while latest_step(logdir) < 0 and first.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    events = sorted(n for n in os.listdir(logdir) if n.startswith('events.out'))
    second = launch(self.data_dir, logdir)
    _, stderr = second.communicate(timeout=120)
    self.assertEqual(second.returncode, 2, stderr)
    self.assertEqual(stderr.strip().splitlines(),
                     [f'run.py: error: --logdir={logdir} is in use by pid {first.pid} on '
                      f'{os.uname().nodename} (see {lock}); wait for that run to end, or use '
                      'another --logdir'])
    self.assertEqual(sorted(n for n in os.listdir(logdir) if n.startswith('events.out')),
                     events, 'the refused launch wrote an event file')
    first.send_signal(signal.SIGKILL)
    first.wait()
    self.assertTrue(os.path.exists(lock))
    third = launch(self.data_dir, logdir)
    _, stderr = third.communicate(timeout=600)
    self.assertEqual(third.returncode, 0, stderr[-3000:])
    self.assertIn(f'taking over {lock} from pid {first.pid}, which is no longer running', stderr)
    self.assertFalse(os.path.exists(lock))

  def disk_full_at_step_30(self):
    """A tiny run trained whole, and the same run in a fresh directory whose write at step 30
    failed: (config, dataset, the whole run's directory, the failed one's, the error)."""
    dataset = fixtures.separable_dataset(num_train=100)
    config = fixtures.tiny_config(noise=0.5, steps=40)
    whole = self.create_tempdir().full_path
    train.train_and_evaluate(config, whole, dataset)
    logdir = self.create_tempdir().full_path
    save_examples = workdir_lib.save_examples

    def save_or_fail(workdir, record):
      # Evaluations at 20, 30, ...: the first write after ckpt-20 is step 30's.
      if os.path.exists(os.path.join(workdir, 'checkpoints', 'ckpt-20.index')):
        with open(os.path.join(workdir, 'examples.npz.tmp'), 'wb') as f:
          f.write(b'half a file')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      save_examples(workdir, record)

    with mock.patch.object(workdir_lib, 'save_examples', save_or_fail):
      with self.assertRaises(WriteFailed) as caught:
        train.train_and_evaluate(config, logdir, dataset)
    return config, dataset, whole, logdir, caught.exception

  def test_a_failed_write_is_one_error_and_the_rerun_resumes(self):
    config, dataset, whole, logdir, error = self.disk_full_at_step_30()
    self.assertRegex(str(error),
                     r'^could not write .*examples\.npz at step 30 \(No space left on device\)\. '
                     r'The last good checkpoint is .*ckpt-20; free space or restore access, '
                     r'then rerun the same command to resume from it$')
    self.assertFalse(os.path.exists(os.path.join(logdir, 'examples.npz.tmp')))
    train.train_and_evaluate(config, logdir, dataset)
    self.assert_same_final_state(whole, logdir)

  def test_what_a_kill_mid_write_leaves_is_removed_on_resume(self):
    config, dataset, whole, logdir, _ = self.disk_full_at_step_30()
    checkpoints = os.path.join(logdir, 'checkpoints')
    # The names TensorFlow writes before renaming: the `checkpoint` state
    # file, a checkpoint's shards, and a record of cg_tf's.
    leftovers = [os.path.join(checkpoints, 'checkpoint.tmp3f2a9c0d1e8b47f6a5c4d3e2f1a0b9c8'),
                 os.path.join(checkpoints, 'ckpt-30_temp', 'part-00000-of-00001.index'),
                 os.path.join(logdir, 'examples.npz.tmp')]
    for path in leftovers:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'wb') as f:
        f.write(b'half a file')
    train.train_and_evaluate(config, logdir, dataset)
    self.assertEqual([path for path in leftovers if os.path.exists(path)], [])
    self.assertFalse(os.path.exists(os.path.join(checkpoints, 'ckpt-30_temp')))
    self.assert_same_final_state(whole, logdir)


def snapshot(directory):
  """{relative path: (size, mtime_ns)} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      stat = os.stat(path)
      out[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns)
  return out


def damage(path, how):
  """Truncates `path` to half, or overwrites it with random bytes of its size."""
  with open(path, 'rb') as f:
    payload = f.read()
  with open(path, 'wb') as f:
    f.write(payload[:len(payload) // 2] if how == 'truncated' else
            np.random.default_rng(0).bytes(max(len(payload), 16)))


@pytest.mark.slow
class DamagedRunTest(parameterized.TestCase, tf.test.TestCase):
  """A run directory whose files a power cut, a full disk or a partial copy damaged."""

  def config(self, steps):
    return fixtures.tiny_config(noise=0.5, steps=steps, eval_every=10, checkpoint_every=10)

  def test_a_damaged_checkpoint_is_skipped_and_the_run_ends_bit_identical(self):
    dataset = fixtures.separable_dataset(num_train=100)
    whole = fixtures.final_weights(self.config(40), dataset, self.create_tempdir().full_path)
    for how in ('truncated', 'random', 'no_index'):
      run_dir = self.create_tempdir().full_path
      train.train_and_evaluate(self.config(30), run_dir, dataset)
      newest = os.path.join(run_dir, 'checkpoints', 'ckpt-30')
      if how == 'no_index':
        os.remove(newest + '.index')
      else:
        damage(tf.io.gfile.glob(newest + '.data-*')[0], how)
      with self.assertLogs('cg_tf', 'WARNING') as logs:
        resumed = fixtures.final_weights(self.config(40), dataset, run_dir)
      self.assertIn('ckpt-30 cannot be read', '\n'.join(logs.output), how)
      for w, r in zip(whole, resumed):
        self.assertAllEqual(w, r, msg=how)

  def test_no_readable_checkpoint_is_one_line_and_exit_2(self):
    data_dir = fixtures.fake_mnist_dir('damaged', num_train=100)
    logdir = self.create_tempdir().full_path
    args = [sys.executable, os.path.join(ROOT, 'run.py'), '--hidden=8', '--batch_size=20',
            '--eval_every=10', '--checkpoint_every=10', f'--data_dir={data_dir}',
            f'--logdir={logdir}']
    subprocess.run([*args, '--steps=20'], cwd=ROOT, capture_output=True, check=True, timeout=300)
    for path in tf.io.gfile.glob(os.path.join(logdir, 'checkpoints', 'ckpt-*.data-*')):
      damage(path, 'random')
    result = subprocess.run([*args, '--steps=30'], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    last = result.stderr.strip().splitlines()[-1]
    self.assertRegex(last, r'^run\.py: error: no checkpoint in .*checkpoints can be read '
                     r'\(ckpt-20, ckpt-10, ckpt-0\); restore them from a copy')
    self.assertNotIn('Traceback', result.stderr)

  # flags.txt is for people to read: a cut copy is a shorter list of flags, not damage.
  @parameterized.parameters(
      (name, how)
      for name in (workdir_lib.CONFIG_FILE, workdir_lib.FLAGS_FILE, workdir_lib.EXAMPLES_FILE,
                   workdir_lib.DECOMPOSITION_FILE, workdir_lib.COHERENCE_FILE,
                   workdir_lib.FINAL_METRICS_FILE)
      for how in ('truncated', 'random')
      if (name, how) != (workdir_lib.FLAGS_FILE, 'truncated'))
  def test_a_damaged_record_is_one_line_and_changes_nothing(self, name, how):
    if not hasattr(type(self), 'finished'):
      data_dir = fixtures.fake_mnist_dir('records', num_train=100)
      logdir = os.path.join(os.environ.get('TEST_TMPDIR', '/tmp'), f'records_{os.getpid()}')
      args = ['--hidden=8', '--batch_size=20', '--eval_every=10', '--checkpoint_every=10',
              '--steps=20', '--decomp_every=10', '--decomp_sample_examples=20',
              '--decomp_sample_weights=5', '--coherence_every=10', f'--data_dir={data_dir}']
      subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *args, f'--logdir={logdir}'],
                     cwd=ROOT, capture_output=True, check=True, timeout=300)
      type(self).finished = (logdir, args)
    source, args = type(self).finished
    run_dir = os.path.join(self.create_tempdir().full_path, 'run')
    subprocess.run(['cp', '-r', source, run_dir], check=True)
    damage(os.path.join(run_dir, name), how)
    before = snapshot(run_dir)
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *args,
                             f'--logdir={run_dir}'], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    self.assertLen(lines, 1, result.stderr)
    self.assertRegex(lines[0], rf'^run\.py: error: .*{name} is damaged \(.+\); ')
    self.assertEqual(snapshot(run_dir), before)
    # The analysis scripts say the same in one line.
    analysis = subprocess.run([sys.executable, os.path.join(ROOT, 'analysis', 'figure1.py'),
                               f'--runs={run_dir}',
                               f'--out={self.create_tempdir().full_path}/f.png'],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(analysis.returncode, 2, analysis.stderr[-2000:])
    self.assertRegex(analysis.stderr.strip(), rf'^figure1\.py: error: --runs: .*{name} is damaged')

  def test_rerunning_a_finished_run_writes_nothing(self):
    data_dir = fixtures.fake_mnist_dir('finished', num_train=100)
    logdir = self.create_tempdir().full_path
    command = [sys.executable, os.path.join(ROOT, 'run.py'), '--hidden=8', '--batch_size=20',
               '--eval_every=10', '--checkpoint_every=10', '--steps=20', f'--data_dir={data_dir}',
               f'--logdir={logdir}']
    subprocess.run(command, cwd=ROOT, capture_output=True, check=True, timeout=300)
    before = snapshot(logdir)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    self.assertIn('is already complete (final_metrics.json); nothing to do', result.stderr)
    self.assertEqual(snapshot(logdir), before)


class FailureReasonTest(tf.test.TestCase):

  def test_tensorflow_internals_stay_out_of_the_line(self):
    error = tf.errors.ResourceExhaustedError(
        None, None, '{{function_node __wrapped__SaveV2_dtypes_14_device_/job:localhost/replica:0/'
        'task:0/device:CPU:0}} /run/checkpoints/ckpt-300_temp/part-00000-of-00001.data-00000-of-'
        '00001.tempstate3598244129778199082; No space left on device [Op:SaveV2]')
    self.assertEqual(train.failure_reason(error), 'No space left on device')
    self.assertEqual(train.failure_reason(OSError(errno.EACCES, 'Permission denied')),
                     'Permission denied')
