"""The compiled CPU kernel (cg_tf/cpu_kernel.py) gives the XLA network's bits, and fails cleanly."""

import os
import platform
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf

from cg_tf import aggregators
from cg_tf import cpu_kernel
from cg_tf import winsorize
from cg_tf.errors import UserInputError
from tests import fixtures
from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bits(values):
  """The float32 values' bit patterns, so that -0.0 and 0.0 differ."""
  return np.asarray(values, np.float32).view(np.int32)


class CpuKernelTest(parameterized.TestCase, tf.test.TestCase):

  def test_builds_and_loads_on_this_machine(self):
    self.assertIsNone(cpu_kernel.unavailable_reason())

  @parameterized.product(kind=['normal', 'ties', 'sparse_errors', 'blank_rows', 'one_class',
                               'negative_inputs'],
                         c=[0.5, 1, 2, 4, 8, 15])
  def test_same_bits_as_xla(self, kind, c):
    # 37 x 33: rows and columns that fill no whole vector of 16.
    a, d = (tf.constant(x) for x in fixtures.layer_factors(kind, 100, 37, 33, seed=int(c * 2)))
    for function, args in ((winsorize.winsorized_outer_sum_and_count, (a, d, float(c))),
                           (winsorize.winsorized_sum_and_count, (d, float(c)))):
      by_xla, by_kernel = (function(*args, backend=backend) for backend in ('xla', 'cpu_kernel'))
      self.assertAllEqual(bits(by_kernel[0]), bits(by_xla[0]))
      self.assertEqual(int(by_kernel[1]), int(by_xla[1]))
    k = winsorize.nearest_ranks(c, 100)[0]
    if k:
      self.assertAllEqual(bits(winsorize.trimmed_outer_sum(a, d, k, backend='cpu_kernel')),
                          bits(winsorize.trimmed_outer_sum(a, d, k, backend='xla')))

  @parameterized.product(kind=['normal', 'ties', 'sparse_errors', 'blank_rows', 'one_class',
                               'negative_inputs'],
                         batch=[1, 2, 3, 7, 64, 100, 101])
  def test_median_same_values_as_xla(self, kind, batch):
    a, d = (tf.constant(x) for x in fixtures.layer_factors(kind, batch, 37, 33, seed=batch))
    by_kernel = aggregators.outer_median(a, d, backend='cpu_kernel')
    # Values, not bits: where the median is an exact 0, tf.sort's order of -0.0
    # and 0.0 is not the kernel's, and the two may differ in sign.
    self.assertAllEqual(by_kernel, aggregators.outer_median(a, d, backend='xla'))
    self.assertAllClose(by_kernel, np.median(np.einsum('bi,bo->bio', *(
        np.asarray(x, np.float64) for x in (a, d))), axis=0), rtol=1e-5, atol=1e-8)

  @parameterized.product(batch=[1, 2, 3, 17, 64], fan_out=[1, 10, 16])
  def test_small_batches_and_widths_match_numpy(self, batch, fan_out):
    a, d = fixtures.layer_factors('ties', batch, 5, fan_out, seed=batch + fan_out)
    per_example = np.einsum('bi,bo->bio', a, d)
    for c in (2, 20, 40):
      total, num_clipped = winsorize.winsorized_outer_sum_and_count(
          tf.constant(a), tf.constant(d), float(c), backend='cpu_kernel')
      self.assertAllClose(total, reference.winsorized_sum(per_example, c), rtol=1e-5, atol=1e-7)
      self.assertEqual(int(num_clipped), reference.num_clipped(per_example, c))

  def test_each_coordinate_keeps_its_bits_in_a_replicas_block_of_columns(self):
    a, d = (tf.constant(x) for x in fixtures.layer_factors('normal', 100, 20, 24, seed=5))
    whole, _ = winsorize.winsorized_outer_sum_and_count(a, d, 4.0, backend='cpu_kernel')
    columns = tf.constant([5, 23, 0, -1], tf.int32)  # the last is padding
    block, _ = winsorize.winsorized_outer_sum_and_count(a, d, 4.0, columns, backend='cpu_kernel')
    self.assertAllEqual(block[:, :3], tf.gather(whole, [5, 23, 0], axis=1))
    self.assertAllEqual(block[:, 3], tf.zeros([20]))
    by_xla, _ = winsorize.winsorized_outer_sum_and_count(a, d, 4.0, columns, backend='xla')
    self.assertAllEqual(bits(block), bits(by_xla))

  def test_extremes_against_sorting(self):
    a, d = fixtures.layer_factors('ties', 50, 9, 18, seed=3)
    values = np.sort(np.einsum('bi,bo->bio', a, d), axis=0)  # float32 products, as the kernel's
    extremes = cpu_kernel.outer_extremes(a, d, num_high=3, num_low=5)
    self.assertAllClose(extremes.largest_sum, values[-3:].astype(np.float64).sum(axis=0),
                        rtol=1e-6, atol=1e-9)
    self.assertAllEqual(extremes.upper, values[-4])
    self.assertAllClose(extremes.smallest_sum, values[:5].astype(np.float64).sum(axis=0),
                        rtol=1e-6, atol=1e-9)
    self.assertAllEqual(extremes.lower, values[5])
    self.assertEqual(int(extremes.num_clipped),
                     int((values[-3:] > values[-4]).sum() + (values[:5] < values[5]).sum()))

  def test_more_clipped_than_the_kernel_keeps_goes_to_xla(self):
    a, d = (tf.constant(x) for x in fixtures.layer_factors('normal', 100, 4, 3, seed=1))
    c = 30  # 30 values a side, over MAX_CLIPPED
    self.assertGreater(winsorize.clipped_per_side(c, 100)[0], cpu_kernel.MAX_CLIPPED)
    total, _ = winsorize.winsorized_outer_sum_and_count(a, d, float(c), backend='cpu_kernel')
    self.assertAllClose(total, reference.winsorized_sum(np.einsum('bi,bo->bio', a, d), c),
                        rtol=1e-5, atol=1e-7)

  def test_the_op_refuses_what_it_cannot_compute(self):
    a, d = fixtures.layer_factors('normal', 4, 3, 2, seed=0)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, 'more examples than it keeps'):
      cpu_kernel.outer_extremes(a, d, num_high=4, num_low=0)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, 'at most 15'):
      cpu_kernel.outer_extremes(np.ones((40, 1), np.float32), np.ones((40, 1), np.float32),
                                num_high=16, num_low=0)

  def test_backend_for(self):
    self.assertEqual(winsorize.backend_for('fast', on_cpus=True), 'cpu_kernel')
    self.assertEqual(winsorize.backend_for('fast', on_cpus=False), 'xla')
    self.assertEqual(winsorize.backend_for('xla', on_cpus=True), 'xla')
    self.assertEqual(winsorize.backend_for('cpu_kernel', on_cpus=True), 'cpu_kernel')
    with self.assertRaisesRegex(UserInputError, 'runs on CPUs'):
      winsorize.backend_for('cpu_kernel', on_cpus=False)

  def test_the_build_is_kept_and_named_by_what_it_depends_on(self):
    library = cpu_kernel._library_path(cpu_kernel._compiler())
    self.assertTrue(os.path.exists(library), library)
    self.assertEqual(os.path.dirname(library), cpu_kernel.cache_dir())

  def run_with_own_cache(self, script):
    """Runs `script` in a fresh Python with an empty kernel cache; its last line of output."""
    result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                            text=True, timeout=600,
                            env=dict(os.environ, CG_TF_CACHE=self.create_tempdir().full_path))
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    return result.stdout.strip().splitlines()[-1]

  @absltest.skipUnless(platform.machine() == 'x86_64', 'x86-64 instruction sets')
  @pytest.mark.slow
  @parameterized.parameters('-march=x86-64', '-march=haswell')
  def test_same_bits_when_compiled_for_an_older_cpu(self, march):
    # The kernel's vectors are as wide as the CPU's registers: 4 floats on
    # baseline x86-64 (SSE2) and 8 on AVX2 (haswell), where this machine may
    # use 8 or 16. Each build must give the XLA network's bits for every sum
    # the kernel serves: winsorized, trimmed, and the median.
    script = f'''
import numpy as np
from cg_tf import aggregators, cpu_kernel, winsorize
from tests import fixtures
cpu_kernel.NATIVE_FLAGS = ({march!r},)
assert cpu_kernel.unavailable_reason() is None, cpu_kernel.unavailable_reason()
bits = lambda x: np.asarray(x).view(np.int32)
for kind in ('ties', 'blank_rows'):
  a, d = fixtures.layer_factors(kind, 100, 21, 13, seed=7)
  for c in (2.0, 8.0):
    x = winsorize.winsorized_outer_sum_and_count(a, d, c, backend='xla')
    k = winsorize.winsorized_outer_sum_and_count(a, d, c, backend='cpu_kernel')
    assert np.array_equal(bits(x[0]), bits(k[0])), ('winsorized', kind, c)
    assert int(x[1]) == int(k[1]), (kind, c)
  for trim in (1, 4):
    x = winsorize.trimmed_outer_sum(a, d, trim, backend='xla')
    k = winsorize.trimmed_outer_sum(a, d, trim, backend='cpu_kernel')
    assert np.array_equal(bits(x), bits(k)), ('trimmed', kind, trim)
  x = aggregators.outer_median(a, d, 'xla')
  k = aggregators.outer_median(a, d, 'cpu_kernel')
  assert np.array_equal(bits(x), bits(k)), ('median', kind)
print('same bits')
'''
    self.assertEqual(self.run_with_own_cache(script), 'same bits')

  @pytest.mark.slow
  def test_a_compiler_that_refuses_the_cpu_flag_builds_without_it(self):
    # Some compilers (or CPUs they do not know) reject -march=native; the
    # build then retries without it, and the kernel still gives XLA's bits.
    script = '''
import numpy as np
from cg_tf import cpu_kernel, winsorize
from tests import fixtures
cpu_kernel.NATIVE_FLAGS = ('-march=no-such-cpu',)
assert cpu_kernel.unavailable_reason() is None, cpu_kernel.unavailable_reason()
a, d = fixtures.layer_factors('ties', 100, 21, 13, seed=7)
x = winsorize.winsorized_outer_sum_and_count(a, d, 2.0, backend='xla')
k = winsorize.winsorized_outer_sum_and_count(a, d, 2.0, backend='cpu_kernel')
assert np.array_equal(np.asarray(x[0]).view(np.int32), np.asarray(k[0]).view(np.int32))
print('built without it')
'''
    self.assertEqual(self.run_with_own_cache(script), 'built without it')

  @pytest.mark.slow
  def test_an_unwritable_cache_builds_for_the_process_alone(self):
    unwritable = os.path.join(self.create_tempdir().full_path, 'cache')
    os.makedirs(unwritable, mode=0o500)
    if os.access(unwritable, os.W_OK):  # root writes anywhere: use a path under a file
      unwritable = os.path.join(self.create_tempfile().full_path, 'cache')
    result = subprocess.run(
        [sys.executable, '-c', 'from cg_tf import cpu_kernel; '
         'print(cpu_kernel.unavailable_reason())'],
        cwd=ROOT, env=dict(os.environ, CG_TF_CACHE=unwritable), capture_output=True, text=True,
        timeout=600)
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    self.assertEqual(result.stdout.strip().splitlines()[-1], 'None')


@pytest.mark.slow
class WithoutCompilerTest(tf.test.TestCase):
  """No C++ compiler: 'fast' winsorizes by XLA and says why; 'cpu_kernel' is one line, exit 2."""

  def run_py(self, *args):
    env = dict(os.environ, CXX='/nonexistent/c++', CG_TF_CACHE=self.create_tempdir().full_path)
    return subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)

  def test_fast_falls_back_to_xla_and_explicit_kernel_is_refused(self):
    data_dir = fixtures.fake_mnist_dir('no_compiler', num_train=200)
    common = [f'--data_dir={data_dir}', '--hidden=8', '--steps=3', '--eval_every=3',
              '--winsor_c=2']
    fast = self.run_py(*common, f'--logdir={self.create_tempdir().full_path}/fast')
    self.assertEqual(fast.returncode, 0, fast.stderr[-2000:])
    self.assertIn('winsorizing by XLA, not the compiled CPU kernel', fast.stderr)
    self.assertIn('/nonexistent/c++ is not on the PATH', fast.stderr)
    self.assertIn('order statistics by XLA', fast.stderr)
    logdir = f'{self.create_tempdir().full_path}/kernel'
    refused = self.run_py(*common, '--winsor_impl=cpu_kernel', f'--logdir={logdir}')
    self.assertEqual(refused.returncode, 2, refused.stderr[-2000:])
    self.assertNotIn('Traceback', refused.stderr)
    self.assertRegex(refused.stderr.strip().splitlines()[-1],
                     r'^run.py: error: --winsor_impl=cpu_kernel: the CPU kernel is not available'
                     r' \(no C\+\+ compiler.*use --winsor_impl=xla')


@pytest.mark.slow
class BuildCommandTest(tf.test.TestCase):

  def build(self, cache, **env):
    return subprocess.run([sys.executable, '-m', 'cg_tf.cpu_kernel', 'build'], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, CG_TF_CACHE=cache, **env))

  def test_builds_once_and_says_where(self):
    cache = self.create_tempdir().full_path
    first = self.build(cache)
    self.assertEqual(first.returncode, 0, first.stderr[-2000:])
    self.assertRegex(first.stdout.strip(), rf'^cg_tf\.cpu_kernel: built {cache}/extremes_\w+\.so '
                     r'with .+ in \d+ s$')
    second = self.build(cache)
    self.assertEqual(second.returncode, 0)
    self.assertRegex(second.stdout.strip(), rf'^cg_tf\.cpu_kernel: already built: {cache}/')

  def test_a_failing_compiler_is_one_line_and_exit_1(self):
    result = self.build(self.create_tempdir().full_path, CXX='/bin/false')
    self.assertEqual(result.returncode, 1)
    self.assertEqual(result.stderr.strip().splitlines()[-1],
                     'cg_tf.cpu_kernel: compiling kernels/extremes.cc failed: exit status 1')
    missing = self.build(self.create_tempdir().full_path, CXX='no-such-compiler')
    self.assertEqual(missing.returncode, 1)
    self.assertIn('no C++ compiler: no-such-compiler is not on the PATH', missing.stderr)


if __name__ == '__main__':
  tf.test.main()
