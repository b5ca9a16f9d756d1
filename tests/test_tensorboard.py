"""What a researcher sees in TensorBoard while a run trains: a real server on a loopback port."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import tensorflow as tf

from tests import fixtures

ROOT = fixtures.ROOT


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
class TensorBoardTest(tf.test.TestCase):

  def get(self, port, route, body=None, timeout=90):
    """The JSON a TensorBoard HTTP data route answers, retried until it answers."""
    deadline = time.time() + timeout
    while True:
      try:
        request = urllib.request.Request(
            f'http://127.0.0.1:{port}{route}', data=None if body is None else
            json.dumps(body).encode(), headers={'Content-Type': 'application/json'})
        with urllib.request.urlopen(request, timeout=10) as response:
          return json.loads(response.read())
      except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
        if time.time() > deadline:
          raise
        time.sleep(1)

  def test_the_papers_panels_and_the_hparams_table_of_a_live_run(self):
    logdir = self.create_tempdir().full_path
    data_dir = fixtures.fake_mnist_dir('tensorboard', num_train=200)
    run = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'run.py'), '--hidden=8', '--batch_size=20',
         '--steps=1000000', '--eval_every=1000', '--checkpoint_every=100000', '--noise=0.5',
         '--decomp_every=1000', '--decomp_sample_examples=20', '--decomp_sample_weights=5',
         f'--data_dir={data_dir}', f'--logdir={logdir}/n0.5'], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, '-m', 'tensorboard.main', f'--logdir={logdir}', f'--port={port}',
         '--host=127.0.0.1', '--load_fast=false', '--reload_interval=1'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      deadline = time.time() + 180
      while True:  # until the live run has logged past step 9
        scalars = self.get(port, '/data/plugin/scalars/scalars?run=n0.5&tag=train/accuracy')
        if len(scalars) > 10 or time.time() > deadline:
          break
        time.sleep(2)
      self.assertIsNone(run.poll())  # still training
      steps = [step for _, step, _ in scalars]
      self.assertEqual(steps[:10], list(range(10)))
      layout = self.get(port, '/data/plugin/custom_scalars/layout')
      titles = [category['title'] for category in layout['category']]
      self.assertEqual(titles, ['Figure 1: label noise (§2.3)',
                                'Figure 4: ta, va and overfit (§3.3)',
                                'Figures 2-3: f^p and f^c (§2.4)',
                                'Collapse: dead units, one class'])
      figure1 = layout['category'][0]['chart'][0]['multiline']['tag']
      self.assertEqual(figure1, ['^train/accuracy$', '^train_pristine/accuracy$',
                                 '^train_corrupt/accuracy$', '^test/accuracy$'])
      # The chart's data, through the Custom Scalars route the dashboard reads.
      pristine = self.get(port, '/data/plugin/custom_scalars/scalars?run=n0.5&tag='
                          + urllib.parse.quote('^train_(pristine|corrupt)/accuracy$'))
      self.assertTrue(pristine['regex_valid'])
      self.assertEqual(sorted(pristine['tag_to_events']), ['train_corrupt/accuracy',
                                                           'train_pristine/accuracy'])
      self.assertGreaterEqual(len(pristine['tag_to_events']['train_pristine/accuracy']), 10)
      experiment = self.get(port, '/data/plugin/hparams/experiment', {'experimentName': ''})
      metrics = [m['name']['tag'] for m in experiment['metricInfos']]
      self.assertEqual(metrics, ['test/accuracy', 'overfit', 'train_corrupt/accuracy',
                                 'train/accuracy'])
      self.assertIn('winsor_c', [h['name'] for h in experiment['hparamInfos']])
    finally:
      for process in (run, server):
        process.send_signal(signal.SIGKILL)
        process.wait()
