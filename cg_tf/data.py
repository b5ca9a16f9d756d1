"""MNIST-like datasets: reading (IDX files or tfds), subsetting, and seeded label noise.

Seed scheme: the training subset and the label noise are functions of
`noise_seed` alone (NumPy generators seeded with [noise_seed, 0] and
[noise_seed, 1]), so a resumed run, or a run with another `seed`, sees exactly
the same noisy dataset.
"""

import dataclasses
import gzip
import hashlib
import os
from typing import Optional

import numpy as np

from cg_tf.errors import UserInputError

NUM_CLASSES = 10
IDX_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}
# The four MNIST files shipped inside the package (mnist_data/README.md).
PACKAGED_MNIST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mnist_data')
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A labelled image-classification dataset in memory.

  Attributes:
    train_images: float32 [n_train, 784], pixels in [0, 1].
    train_labels: int32 [n_train], the clean labels.
    test_images: float32 [n_test, 784].
    test_labels: int32 [n_test].
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (optionally gzip-compressed) into a NumPy array.

  Args:
    path: file path; a name ending in '.gz' is decompressed.

  Returns:
    An array whose shape and dtype are those the IDX header declares.

  Raises:
    UserInputError: the file is missing, truncated, or not IDX.
  """
  try:
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise UserInputError(f'cannot read IDX file {path}: {e}') from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise UserInputError(f'{path} is not an IDX file (bad magic number)')
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise UserInputError(f'{path} is truncated (incomplete IDX header)')
  shape = tuple(int(d) for d in np.frombuffer(raw, '>u4', count=ndim, offset=4))
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != expected:
    raise UserInputError(f'{path} holds {len(raw) - header} data bytes; its header '
                         f'{shape} promises {expected}')
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder('='))


def _find_idx(data_dir: str, stem: str) -> str:
  for name in (stem, stem + '.gz'):
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
      return path
  raise UserInputError(f'--data_dir={data_dir} has no {stem}[.gz]; it needs the four '
                       f'IDX files ({", ".join(IDX_FILES.values())})')


def _as_dataset(train_images, train_labels, test_images, test_labels, source) -> Dataset:
  """Flattens and scales images, checks shapes agree."""
  arrays = {}
  for split, images, labels in (('train', train_images, train_labels),
                                ('test', test_images, test_labels)):
    if images.ndim < 2 or labels.ndim != 1 or len(images) != len(labels):
      raise UserInputError(f'{source}: {split} images {images.shape} and labels '
                           f'{labels.shape} do not match')
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
      raise UserInputError(f'{source}: {split} labels must lie in 0..{NUM_CLASSES - 1}')
    arrays[split] = (images.reshape(len(images), -1).astype(np.float32) / 255.0,
                     labels.astype(np.int32))
  if arrays['train'][0].shape[1] != arrays['test'][0].shape[1]:
    raise UserInputError(f'{source}: train and test images differ in size')
  return Dataset(*arrays['train'], *arrays['test'])


def load_idx_dir(data_dir: str) -> Dataset:
  """Loads the four standard IDX files (as MNIST ships them) from `data_dir`.

  Raises:
    UserInputError: the directory or a file is missing or malformed.
  """
  if not os.path.isdir(data_dir):
    raise UserInputError(f'--data_dir={data_dir} is not a directory; point it at the '
                         'folder holding the four MNIST IDX files')
  parts = {key: read_idx(_find_idx(data_dir, stem)) for key, stem in IDX_FILES.items()}
  return _as_dataset(parts['train_images'], parts['train_labels'], parts['test_images'],
                     parts['test_labels'], f'--data_dir={data_dir}')


def load_packaged_mnist() -> Dataset:
  """MNIST from the copy shipped in the package, checked against its SHA256SUMS.

  Raises:
    UserInputError: a file is missing or its checksum is wrong.
  """
  try:
    with open(os.path.join(PACKAGED_MNIST_DIR, 'SHA256SUMS')) as f:
      sums = dict(reversed(line.split()) for line in f if line.strip())
    for name, expected in sums.items():
      with open(os.path.join(PACKAGED_MNIST_DIR, name), 'rb') as f:
        if hashlib.sha256(f.read()).hexdigest() != expected:
          raise UserInputError(f'{PACKAGED_MNIST_DIR}/{name} does not match its SHA256SUMS '
                               'entry; reinstall cg_tf or pass --data_dir')
  except OSError as e:
    raise UserInputError(f'the MNIST copy shipped with cg_tf is incomplete ({e.strerror}: '
                         f'{e.filename}); reinstall cg_tf or pass --data_dir') from None
  return load_idx_dir(PACKAGED_MNIST_DIR)


def load_tfds(name: str) -> Dataset:
  """Loads `name` ('mnist', 'fashion_mnist') through tensorflow_datasets.

  Raises:
    UserInputError: tfds cannot download or find the dataset.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    splits = tfds.load(name, split=['train', 'test'], as_supervised=True)
    # Finite batches: batch_size=-1 batches by 2**63 - 1 when the split size
    # is unknown, which tf.data cannot allocate.
    arrays = [[np.concatenate(part) for part in zip(*tfds.as_numpy(split.batch(10_000)))]
              for split in splits]
  except Exception as e:  # pylint: disable=broad-except
    raise UserInputError(f'tensorflow_datasets could not load {name!r} ({type(e).__name__}: '
                         f'{str(e).strip().splitlines()[0][:200] if str(e).strip() else ""}); '
                         'without network access pass --data_dir=DIR with the four IDX '
                         'files') from None
  (train_images, train_labels), (test_images, test_labels) = arrays
  return _as_dataset(train_images, train_labels, test_images, test_labels, f'tfds:{name}')


def uses_tfds(dataset: str, data_dir: Optional[str]) -> bool:
  """True if `load(dataset, data_dir)` goes through tensorflow_datasets."""
  return not data_dir and dataset != 'mnist'


def load(dataset: str, data_dir: Optional[str]) -> Dataset:
  """Loads from `data_dir` when given; else MNIST from the package, other datasets by tfds."""
  if data_dir:
    return load_idx_dir(data_dir)
  return load_tfds(dataset) if uses_tfds(dataset, data_dir) else load_packaged_mnist()


def subset_indices(num_examples: int, size: int, noise_seed: int) -> np.ndarray:
  """Indices (sorted) of a fixed random subset of `size` of `num_examples`; 0 = all."""
  if size == 0 or size == num_examples:
    return np.arange(num_examples)
  if size > num_examples:
    raise UserInputError(f'--train_size={size} exceeds the {num_examples} training examples')
  rng = np.random.default_rng([noise_seed, 0])
  return np.sort(rng.choice(num_examples, size, replace=False))


def corrupt_labels(labels: np.ndarray, noise: float, noise_seed: int) -> np.ndarray:
  """The paper's label noise (§2.1): permute the labels of round(noise * n) examples.

  Exactly round(noise * n) examples are chosen uniformly at random, and their
  labels are randomly permuted among themselves, so the label histogram is
  unchanged. Some chosen examples keep their label: they remain pristine.

  Args:
    labels: int [n] clean labels.
    noise: fraction in [0, 1].
    noise_seed: seed; the result is a function of (labels, noise, noise_seed).

  Returns:
    int32 [n] training labels. `corrupt_mask = result != labels`.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng([noise_seed, 1])
  num_chosen = int(round(noise * len(labels)))
  chosen = rng.choice(len(labels), num_chosen, replace=False)
  noisy = labels.astype(np.int32).copy()
  noisy[chosen] = labels[rng.permutation(chosen)]
  return noisy


@dataclasses.dataclass(frozen=True)
class NoisyDataset:
  """The training set the model sees, with what it would have seen without noise.

  Attributes:
    data: the (possibly subsetted) clean dataset.
    train_labels: int32 [n_train], labels after corruption.
    subset: int [n_train], indices of the training examples in the full set.
  """
  data: Dataset
  train_labels: np.ndarray
  subset: np.ndarray

  @property
  def corrupt(self) -> np.ndarray:
    """bool [n_train]: True where the training label differs from the clean one."""
    return self.train_labels != self.data.train_labels

  @property
  def num_train(self) -> int:
    return len(self.train_labels)


def make_noisy(data: Dataset, train_size: int, noise: float, noise_seed: int) -> NoisyDataset:
  """Subsets the training set and corrupts its labels; the test set is untouched."""
  subset = subset_indices(len(data.train_labels), train_size, noise_seed)
  clean = dataclasses.replace(data, train_images=data.train_images[subset],
                              train_labels=data.train_labels[subset])
  return NoisyDataset(clean, corrupt_labels(clean.train_labels, noise, noise_seed), subset)
