"""The compiled CPU kernels of the fast winsorized and trimmed sums and the median (cg_tf/kernels/).

On a CPU, XLA turns winsorize.py's min/max network into one loop per running
extreme, each recomputing the comparisons it depends on (docs/results.md).
kernels/extremes.cc instead keeps every coordinate's running extremes in
vector registers for the whole batch and skips the exact zeros of each row
of a Dense layer's inputs. It returns the same bits as the XLA network
(tests/test_cpu_kernel.py), so which one runs changes the speed only.

The kernel is compiled on first use, against the installed TensorFlow, for
this CPU (-march=native), by $CXX or else g++, into $CG_TF_CACHE or else
~/.cache/cg_tf. The file name hashes the sources, TensorFlow's version and
flags, the compiler and the CPU, so later processes on the machine load it
at once, and a changed source, TensorFlow or CPU gets a build of its own.
If the cache cannot be written, it is compiled into a temporary directory for
the process. Without a compiler, `unavailable_reason` says why and
winsorize.py keeps XLA.
"""

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple, Optional, Tuple

import tensorflow as tf

log = logging.getLogger('cg_tf')

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels')
SOURCES = ('extremes.h', 'extremes.cc', 'extremes_op.cc')
# Values clipped a side that the kernel handles (kernels/extremes.h: kMaxKept - 1).
MAX_CLIPPED = 15
# Compilation of extremes.cc. Contraction into FMAs is off so that products are
# rounded as XLA rounds them; -march=native is dropped if the compiler refuses it.
KERNEL_FLAGS = ('-O3', '-std=c++17', '-fPIC', '-ffp-contract=off')
NATIVE_FLAGS = ('-march=native',)


class Extremes(NamedTuple):
  """Per coordinate [fan_in, fan_out]: sum of the num_high largest values, the next
  largest (`upper`), sum of the num_low smallest, the next smallest (`lower`); and
  int64 [] how many values lie strictly outside [lower, upper]."""
  largest_sum: tf.Tensor
  upper: tf.Tensor
  smallest_sum: tf.Tensor
  lower: tf.Tensor
  num_clipped: tf.Tensor


def cache_dir() -> str:
  """Where built kernels are kept: $CG_TF_CACHE, else $XDG_CACHE_HOME/cg_tf or ~/.cache/cg_tf."""
  if os.environ.get('CG_TF_CACHE'):
    return os.environ['CG_TF_CACHE']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'cg_tf')


def _compiler() -> Optional[str]:
  return shutil.which(os.environ.get('CXX') or 'g++')


def _cpu_identity() -> str:
  """What -march=native depends on: the machine and, on Linux, the CPU's model and flags."""
  try:
    with open('/proc/cpuinfo') as f:
      lines = sorted({line.strip() for line in f
                      if line.startswith(('model name', 'flags', 'Features', 'CPU part'))})
  except OSError:
    lines = [platform.processor()]
  return '\n'.join([platform.machine(), *lines])


def _run(command, what):
  """Runs a compiler command; raises RuntimeError with its first error line."""
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    lines = result.stderr.strip().splitlines() or [f'exit status {result.returncode}']
    first = next((line for line in lines if 'error' in line), lines[-1])
    raise RuntimeError(f'{what} failed: {first.strip()}')


def _build(compiler: str, target: str) -> None:
  """Compiles the sources into the shared library `target`, atomically."""
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
    kernel, op, library = (os.path.join(tmp, name) for name in ('extremes.o', 'op.o', 'lib.so'))
    kernel_source = os.path.join(SOURCE_DIR, 'extremes.cc')
    try:
      _run([compiler, *KERNEL_FLAGS, *NATIVE_FLAGS, '-c', kernel_source, '-o', kernel],
           'compiling kernels/extremes.cc')
    except RuntimeError:
      _run([compiler, *KERNEL_FLAGS, '-c', kernel_source, '-o', kernel],
           'compiling kernels/extremes.cc')
    # TensorFlow's headers warn by the hundred; only errors matter here.
    _run([compiler, '-O2', '-fPIC', '-w', *tf.sysconfig.get_compile_flags(), '-c',
          os.path.join(SOURCE_DIR, 'extremes_op.cc'), '-o', op], 'compiling kernels/extremes_op.cc')
    shared = ['-shared'] + (['-undefined', 'dynamic_lookup'] if sys.platform == 'darwin' else [])
    _run([compiler, *shared, kernel, op, '-o', library, *tf.sysconfig.get_link_flags()],
         'linking the CPU kernel')
    os.replace(library, target)


def _library_path(compiler: str) -> str:
  digest = hashlib.sha256()
  for name in SOURCES:
    with open(os.path.join(SOURCE_DIR, name), 'rb') as f:
      digest.update(f.read())
  version = subprocess.run([compiler, '--version'], capture_output=True, text=True).stdout
  for part in (tf.__version__, *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags(),
               *KERNEL_FLAGS, *NATIVE_FLAGS, compiler, version, _cpu_identity()):
    digest.update(part.encode() + b'\0')
  return os.path.join(cache_dir(), f'extremes_{digest.hexdigest()[:16]}.so')


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[Optional[object], Optional[str]]:
  """(the loaded op library, None), or (None, why it cannot be had)."""
  compiler = _compiler()
  if compiler is None:
    return None, (f'no C++ compiler: {os.environ.get("CXX") or "g++"} is not on the PATH '
                  '(install g++, or set CXX)')
  path = _library_path(compiler)
  if not os.path.exists(path):
    start = time.time()
    log.info('compiling the CPU winsorization kernel into %s (once per machine)', path)
    try:
      try:
        _build(compiler, path)
      except OSError as e:  # the cache cannot be written: build for this process alone
        path = os.path.join(tempfile.mkdtemp(prefix='cg_tf_kernel_'), os.path.basename(path))
        log.info('%s cannot be written (%s); compiling into %s for this run only',
                 cache_dir(), e.strerror or e, os.path.dirname(path))
        _build(compiler, path)
    except (RuntimeError, OSError) as e:
      return None, str(e)
    log.info('compiled the CPU winsorization kernel in %.0f s', time.time() - start)
  try:
    library = tf.load_op_library(path)
  except (tf.errors.NotFoundError, OSError) as e:
    return None, f'{path} cannot be loaded: {str(e).splitlines()[0]}'
  tf.no_gradient('CgTfOuterExtremes')
  tf.no_gradient('CgTfOuterMiddles')
  return library, None


def unavailable_reason() -> Optional[str]:
  """None if the kernel is built (or builds now) and loads; else why not, in one line."""
  return _load()[1]


def _library():
  library, reason = _load()
  if library is None:
    raise RuntimeError(f'the CPU winsorization kernel is not available: {reason}')
  return library


def outer_extremes(activations: tf.Tensor, deltas: tf.Tensor, num_high: int,
                   num_low: int) -> Extremes:
  """Extremes of the values activations[e, i] * deltas[e, j] over e, coordinate by coordinate.

  Args:
    activations: float32 [batch, fan_in].
    deltas: float32 [batch, fan_out].
    num_high, num_low: values a side whose sum is returned, each at most
      MAX_CLIPPED and below batch.

  Returns:
    Extremes of [fan_in, fan_out] tensors.

  Raises:
    RuntimeError: the kernel is not available (unavailable_reason() says why).
  """
  return Extremes(*_library().cg_tf_outer_extremes(activations, deltas, num_high=num_high,
                                                    num_low=num_low))


def outer_middles(activations: tf.Tensor, deltas: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """The two middle values over e of activations[e, i] * deltas[e, j], coordinate by coordinate.

  Args:
    activations: float32 [batch, fan_in].
    deltas: float32 [batch, fan_out].

  Returns:
    (lower, upper), each [fan_in, fan_out]: the values at sorted positions
    batch // 2 - 1 and batch // 2 (batch // 2 for both when batch is odd); 0
    and 0 where more than half of the row's activations or of the column's
    errors are 0, which makes the median 0.

  Raises:
    RuntimeError: the kernel is not available (unavailable_reason() says why).
  """
  return tuple(_library().cg_tf_outer_middles(activations, deltas))


def main(argv) -> int:
  """`python -m cg_tf.cpu_kernel build`: compiles the kernel now, for machine images and CI.

  Prints where the library went (or that it is already built there) and
  returns 0; without a compiler, or when the compiler fails, prints the
  compiler's message and returns 1.
  """
  if argv[1:] != ['build']:
    print('usage: python -m cg_tf.cpu_kernel build', file=sys.stderr)
    return 2
  compiler = _compiler()
  if compiler is None:
    print(f'cg_tf.cpu_kernel: no C++ compiler: {os.environ.get("CXX") or "g++"} is not on the '
          'PATH (install g++, or set CXX)', file=sys.stderr)
    return 1
  path = _library_path(compiler)
  if os.path.exists(path):
    print(f'cg_tf.cpu_kernel: already built: {path}')
    return 0
  start = time.time()
  try:
    _build(compiler, path)
  except (RuntimeError, OSError) as e:
    print(f'cg_tf.cpu_kernel: {e}', file=sys.stderr)
    return 1
  print(f'cg_tf.cpu_kernel: built {path} with {compiler} in {time.time() - start:.0f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
