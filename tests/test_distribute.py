"""The same bits on 1, 2 and 4 replicas and on 2 workers; resuming across replica counts.

Exercised on logical CPU devices (MirroredStrategy) and on worker processes on
localhost ports (MultiWorkerMirroredStrategy): each run is its own process,
because logical devices must be configured before TensorFlow starts.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl.testing import parameterized
import pytest
import tensorflow as tf

from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--hidden=32', '--batch_size=50', '--eval_every=20', '--checkpoint_every=20',
         '--eval_batch_size=500', '--noise=0.5']


def free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(('localhost', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def run_py(*args, env=None, wait=True):
  command = [sys.executable, os.path.join(ROOT, 'run.py'), *args]
  env = {**os.environ, **(env or {})}
  if not wait:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def start_workers(logdir, flags, ports):
  """run.py as the workers of a local MultiWorkerMirroredStrategy cluster, one process each."""
  cluster = {'worker': [f'localhost:{port}' for port in ports]}
  return [run_py(*flags, '--strategy=multiworker', f'--logdir={logdir}', wait=False,
                 env={'TF_CONFIG': json.dumps({'cluster': cluster,
                                               'task': {'type': 'worker', 'index': i}})})
          for i in range(len(ports))]


def checkpointed_weights(logdir):
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(logdir,
                                                                            'checkpoints')))
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if name.startswith('optimizer/_trainable_variables/')}


CASES = {
    'sgd': {'winsor_c': 0},
    'winsorized_fast': {'winsor_c': 2},  # the compiled CPU kernel
    'winsorized_xla': {'winsor_c': 2, 'winsor_impl': 'xla'},  # what GPUs and TPUs run
    'winsorized_reference': {'winsor_c': 2, 'winsor_impl': 'reference'},
    'with_decomposition': {'decomp_every': 25},
    'with_forgetting': {'winsor_c': 2, 'forgetting': True},
    'trimmed_mean': {'aggregator': 'trimmed_mean', 'trim_k': 3},
    'dp': {'aggregator': 'dp', 'clip_norm': 0.5, 'noise_multiplier': 1.0},
    'rm3': {'aggregator': 'rm3'},
    'm3': {'aggregator': 'm3'},
    'ra3': {'aggregator': 'ra3'},
    'median': {'aggregator': 'median'},
    'l2clip': {'aggregator': 'l2clip', 'clip_norm': 0.5},
}


# The cases that also run on 4 replicas: the rules split by output columns
# (winsorize, trimmed mean), whose 4-way split is uneven; the §2.4
# measurement; and two of the rules computed whole on the first replica
# (median, l2clip), where three replicas must add exact zeros. The other
# rules of that kind run on 1 and 2.
FOUR_REPLICA_CASES = ('winsorized_fast', 'winsorized_xla', 'with_decomposition',
                      'trimmed_mean', 'median', 'l2clip')
# A checkpoint saved halfway on one replica count, resumed on the next count:
# 2 replicas save, 1 resumes; 1 saves, 4 resume.
HANDOFF = 'winsorized_fast'
REPLICA_ORDER = (2, 1, 4)


@pytest.mark.slow
class ReplicasTest(parameterized.TestCase, tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    # One process per replica count trains every case, which saves a
    # TensorFlow start-up per run; each process runs a fixed sequence of
    # configs, so the comparisons below are between identical sequences.
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.runs = {}
    halfway = None
    for n in REPLICA_ORDER:
      cases = {name: overrides for name, overrides in CASES.items()
               if n < 4 or name in FOUR_REPLICA_CASES}
      workdir = os.path.join(cls.workdir, str(n))
      if halfway:
        shutil.copytree(halfway, os.path.join(workdir, 'resumed'))
        cases['resumed'] = CASES[HANDOFF]
      # The last replica count hands off to none.
      if n != REPLICA_ORDER[-1]:
        cases['halfway'] = {**CASES[HANDOFF], 'steps': 25}
      cls.runs[n] = fixtures.replica_runs(n, cases, workdir)
      halfway = os.path.join(workdir, 'halfway')

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.workdir, ignore_errors=True)
    super().tearDownClass()

  def assert_same_run(self, expected, got):
    (expected_metrics, expected_arrays), (metrics, arrays) = expected, got
    self.assertEqual(sorted(expected_arrays), sorted(arrays))
    for name, value in expected_arrays.items():
      self.assertAllEqual(arrays[name], value, msg=name)
    for name, value in expected_metrics.items():
      if name not in ('steps_per_second', 'resumed_from'):
        self.assertEqual(metrics[name], value, name)

  @parameterized.named_parameters(*[(name, name) for name in CASES])
  def test_one_two_and_four_replicas_give_the_same_bits(self, case):
    counts = (2, 4) if case in FOUR_REPLICA_CASES else (2,)
    for n in counts:
      self.assert_same_run(self.runs[1][case], self.runs[n][case])
    overrides = CASES[case]
    if overrides.get('forgetting'):
      events = [v for k, v in self.runs[1][case][1].items() if k.startswith('forgetting_events')]
      self.assertLen(events, 1)
      self.assertGreater(events[0].sum(), 0)
    if overrides.get('winsor_c') and overrides.get('winsor_impl') != 'reference':
      # c = 2 of a batch of 100 clips 2 + 2 values of each coordinate; each
      # replica counts its own columns, and the fraction logged is their sum.
      self.assertGreater(self.runs[1][case][0]['train_batch/winsor_clipped_fraction'], 0.0)

  @parameterized.parameters((2, 1), (1, 4))
  def test_a_checkpoint_resumes_on_another_replica_count(self, saved_on, resumed_on):
    self.assertEqual(REPLICA_ORDER[REPLICA_ORDER.index(resumed_on) - 1], saved_on)
    self.assertEqual(self.runs[resumed_on]['resumed'][0]['resumed_from'], 25)
    self.assert_same_run(self.runs[1][HANDOFF], self.runs[resumed_on]['resumed'])


@pytest.mark.slow
class LaunchTest(parameterized.TestCase, tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = fixtures.fake_mnist_dir('distribute', num_train=400)

  @parameterized.named_parameters(
      ('no_tpu', ['--strategy=tpu'], {}, '--strategy=tpu could not reach the TPU'),
      ('no_tf_config', ['--strategy=multiworker'], {'TF_CONFIG': ''},
       '--strategy=multiworker needs TF_CONFIG'),
      ('bad_tf_config', ['--strategy=multiworker'], {'TF_CONFIG': '{"task": 1'},
       'TF_CONFIG must be JSON'),
      ('cpu_replicas_without_mirrored', ['--cpu_replicas=2'], {}, '--cpu_replicas needs'),
      ('mirrored_without_gpu', ['--strategy=mirrored'], {}, 'found no GPU'),
  )
  def test_bad_hardware_request_is_one_line_and_exit_2(self, args, env, message):
    logdir = os.path.join(self.create_tempdir().full_path, 'run')
    result = run_py(f'--data_dir={self.data_dir}', '--steps=20', *SMALL, *args,
                    f'--logdir={logdir}', env=env)
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertNotIn('Traceback', result.stderr)
    # TensorFlow's start-up banner may come first; the error is the last line.
    last = result.stderr.strip().splitlines()[-1]
    self.assertStartsWith(last, 'run.py: error: ')
    self.assertIn(message, last)

  def test_two_workers_match_one_device_and_a_killed_pair_resumes(self):
    flags = [f'--data_dir={self.data_dir}', '--steps=200', '--winsor_c=2', *SMALL]
    one = self.create_tempdir().full_path
    self.assertEqual(run_py(*flags, f'--logdir={one}').returncode, 0)

    logdir = self.create_tempdir().full_path
    pair = start_workers(logdir, flags, free_ports(2))
    index = os.path.join(logdir, 'checkpoints', 'ckpt-60.index')
    deadline = time.time() + 300
    while not os.path.exists(index) and all(p.poll() is None for p in pair) and (
        time.time() < deadline):
      time.sleep(0.05)
    for process in pair:
      process.send_signal(signal.SIGKILL)
      process.wait()
    self.assertFalse(os.path.exists(os.path.join(logdir, 'checkpoints', 'ckpt-200.index')),
                     'the workers finished before they could be killed')

    pair = start_workers(logdir, flags, free_ports(2))
    for process in pair:
      _, stderr = process.communicate(timeout=600)
      self.assertEqual(process.returncode, 0, stderr[-3000:])
    self.assertIn('resuming at step', stderr)
    with open(os.path.join(one, 'final_metrics.json')) as f:
      expected = json.load(f)
    with open(os.path.join(logdir, 'final_metrics.json')) as f:
      got = json.load(f)
    self.assertEqual(got['step'], 200)
    for name, value in expected['metrics'].items():
      if name != 'steps_per_second':
        self.assertEqual(got['metrics'][name], value, name)
    expected_weights, weights = checkpointed_weights(one), checkpointed_weights(logdir)
    for name, value in expected_weights.items():
      self.assertAllEqual(weights[name], value, msg=name)
    # Only the chief writes the run directory; the other worker's scratch
    # checkpoints are gone.
    self.assertEqual(sorted(n for n in os.listdir(os.path.join(logdir, 'checkpoints'))
                            if not n.startswith('ckpt-') and n != 'checkpoint'), [])
    self.assertLen([n for n in os.listdir(logdir) if n.startswith('events.out')], 2)


@pytest.mark.slow
class PreemptionTest(parameterized.TestCase, tf.test.TestCase):
  """A SIGTERM that reaches one worker of two stops both, at the same step, and they resume."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = fixtures.fake_mnist_dir('preemption', num_train=400)
    cls.flags = [f'--data_dir={cls.data_dir}', '--steps=600', '--winsor_c=2', *SMALL]
    cls.one = tempfile.mkdtemp()
    assert run_py(*cls.flags, f'--logdir={cls.one}').returncode == 0

  @parameterized.named_parameters(('the_other_worker', 1), ('the_chief', 0))
  def test_one_sigterm_stops_both_workers_and_they_resume_bit_identical(self, signalled):
    logdir = self.create_tempdir().full_path
    pair = start_workers(logdir, self.flags, free_ports(2))
    first = os.path.join(logdir, 'checkpoints', 'ckpt-100.index')
    deadline = time.time() + 300
    while not os.path.exists(first) and time.time() < deadline:
      time.sleep(0.05)
    pair[signalled].send_signal(signal.SIGTERM)
    outputs = [process.communicate(timeout=300)[1] for process in pair]
    for process, stderr in zip(pair, outputs):
      self.assertEqual(process.returncode, 143, stderr[-3000:])
    lines = [stderr.strip().splitlines()[-1] for stderr in outputs]
    self.assertEqual(lines[0], lines[1])
    self.assertRegex(lines[0], r'^run\.py: stopped by SIGTERM at step \d+; saved .*ckpt-\d+\. '
                     r'Rerun the same command to resume$')
    self.assertFalse(os.path.exists(os.path.join(logdir, 'final_metrics.json')))

    pair = start_workers(logdir, self.flags, free_ports(2))
    for process in pair:
      _, stderr = process.communicate(timeout=600)
      self.assertEqual(process.returncode, 0, stderr[-3000:])
    self.assertIn('resuming at step', stderr)
    expected, got = checkpointed_weights(self.one), checkpointed_weights(logdir)
    for name, value in expected.items():
      self.assertAllEqual(got[name], value, msg=name)
