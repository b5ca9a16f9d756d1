"""Label noise, subsets and the IDX reader against independent references."""

import gzip
import hashlib
import os
import shutil
from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from cg_tf import data
from cg_tf.errors import UserInputError
from tests import fixtures

SHARED_MNIST = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'mnist')


class CorruptLabelsTest(parameterized.TestCase):

  @parameterized.product(noise=[0.0, 0.25, 0.5, 0.75, 1.0], seed=[0, 7])
  def test_paper_definition(self, noise, seed):
    rng = np.random.default_rng(1000 + seed)
    labels = rng.integers(0, 10, 1001)
    noisy = data.corrupt_labels(labels, noise, seed)
    changed = noisy != labels
    # Labels are permuted among round(noise * n) chosen examples: the histogram
    # is kept and no more than that many examples change.
    np.testing.assert_array_equal(np.bincount(noisy, minlength=10),
                                  np.bincount(labels, minlength=10))
    self.assertLessEqual(changed.sum(), round(noise * len(labels)))
    # With 10 balanced classes a chosen example keeps its label with chance ~0.1.
    expected = 0.9 * noise * len(labels)
    self.assertLess(abs(changed.sum() - expected), 5 * np.sqrt(expected + 1) + 2)
    self.assertEqual(noisy.dtype, np.int32)

  def test_same_seed_same_labels_other_seed_other_labels(self):
    labels = np.random.default_rng(0).integers(0, 10, 500)
    np.testing.assert_array_equal(data.corrupt_labels(labels, 0.5, 3),
                                  data.corrupt_labels(labels, 0.5, 3))
    self.assertFalse(np.array_equal(data.corrupt_labels(labels, 0.5, 3),
                                    data.corrupt_labels(labels, 0.5, 4)))

  def test_single_class_has_nothing_to_corrupt(self):
    labels = np.full(100, 3)
    np.testing.assert_array_equal(data.corrupt_labels(labels, 1.0, 0), labels)

  def test_exact_count_chosen(self):
    # Distinct labels make every moved label visible: a permutation of k
    # distinct values leaves about one fixed point, so almost all k change.
    labels = np.arange(1000)
    for noise in (0.25, 0.5, 1.0):
      changed = (data.corrupt_labels(labels, noise, 0) != labels).sum()
      self.assertBetween(changed, round(noise * 1000) - 5, round(noise * 1000))

  def test_make_noisy_leaves_test_set_alone(self):
    rng = np.random.default_rng(0)
    clean = data.Dataset(rng.random((300, 4), np.float32), rng.integers(0, 10, 300).astype(np.int32),
                         rng.random((50, 4), np.float32), rng.integers(0, 10, 50).astype(np.int32))
    noisy = data.make_noisy(clean, 120, 1.0, 5)
    np.testing.assert_array_equal(noisy.data.test_labels, clean.test_labels)
    np.testing.assert_array_equal(noisy.data.test_images, clean.test_images)
    np.testing.assert_array_equal(noisy.data.train_labels, clean.train_labels[noisy.subset])
    np.testing.assert_array_equal(noisy.corrupt, noisy.train_labels != noisy.data.train_labels)
    self.assertEqual(noisy.num_train, 120)


class SubsetTest(tf.test.TestCase):

  def test_fixed_sorted_unique(self):
    a = data.subset_indices(1000, 100, 3)
    np.testing.assert_array_equal(a, data.subset_indices(1000, 100, 3))
    self.assertLen(np.unique(a), 100)
    np.testing.assert_array_equal(a, np.sort(a))
    np.testing.assert_array_equal(data.subset_indices(10, 0, 3), np.arange(10))

  def test_too_large(self):
    with self.assertRaisesRegex(UserInputError, 'train_size=11'):
      data.subset_indices(10, 11, 0)


class IdxTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_roundtrip(self, gz):
    directory = self.create_tempdir().full_path
    fixtures.write_fake_mnist(directory, gz=gz)
    loaded = data.load_idx_dir(directory)
    self.assertEqual(loaded.train_images.shape, (200, 784))
    self.assertEqual(loaded.test_images.shape, (50, 784))
    self.assertEqual(loaded.train_images.dtype, np.float32)
    self.assertBetween(float(loaded.train_images.max()), 1.0, 1.0)
    raw = data.read_idx(os.path.join(directory, 'train-labels-idx1-ubyte' + ('.gz' if gz else '')))
    np.testing.assert_array_equal(raw, loaded.train_labels)

  def test_other_dtypes(self):
    path = os.path.join(self.create_tempdir().full_path, 'x')
    array = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    fixtures.write_idx(path, array)
    np.testing.assert_array_equal(data.read_idx(path), array)

  def test_bad_magic(self):
    path = os.path.join(self.create_tempdir().full_path, 'bad')
    with open(path, 'wb') as f:
      f.write(b'PK\x03\x04 not idx at all')
    with self.assertRaisesRegex(UserInputError, 'not an IDX file'):
      data.read_idx(path)

  def test_truncated(self):
    path = os.path.join(self.create_tempdir().full_path, 'short')
    fixtures.write_idx(path, np.zeros((5, 3), np.uint8))
    with open(path, 'rb') as f:
      raw = f.read()
    with open(path, 'wb') as f:
      f.write(raw[:-2])
    with self.assertRaisesRegex(UserInputError, 'promises'):
      data.read_idx(path)

  def test_missing_file_and_directory(self):
    directory = self.create_tempdir().full_path
    fixtures.write_fake_mnist(directory)
    os.remove(os.path.join(directory, 't10k-labels-idx1-ubyte.gz'))
    with self.assertRaisesRegex(UserInputError, 't10k-labels-idx1-ubyte'):
      data.load_idx_dir(directory)
    with self.assertRaisesRegex(UserInputError, 'not a directory'):
      data.load_idx_dir(os.path.join(directory, 'nope'))

  def test_packaged_mnist_is_the_original(self):
    # The well-known MD5 sums of the four decompressed MNIST files.
    md5 = {'train-images-idx3-ubyte': '6bbc9ace898e44ae57da46a324031adb',
           'train-labels-idx1-ubyte': 'a25bea736e30d166cdddb491f175f624',
           't10k-images-idx3-ubyte': '2646ac647ad5339dbf082846283269ea',
           't10k-labels-idx1-ubyte': '27ae3e4e09519cfbb04c329615203637'}
    for stem, expected in md5.items():
      with gzip.open(os.path.join(data.PACKAGED_MNIST_DIR, stem + '.gz'), 'rb') as f:
        self.assertEqual(hashlib.md5(f.read()).hexdigest(), expected, stem)
    mnist = data.load('mnist', None)
    self.assertEqual(mnist.train_images.shape, (60000, 784))
    self.assertEqual(mnist.test_images.shape, (10000, 784))
    np.testing.assert_array_equal(mnist.train_labels[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    np.testing.assert_array_equal(mnist.test_labels[:5], [7, 2, 1, 0, 4])
    # The well-known class counts of MNIST's training set.
    np.testing.assert_array_equal(np.bincount(mnist.train_labels),
                                  [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    if os.path.isdir(SHARED_MNIST):
      shared = data.load_idx_dir(SHARED_MNIST)
      np.testing.assert_array_equal(shared.train_images, mnist.train_images)
      np.testing.assert_array_equal(shared.test_labels, mnist.test_labels)

  def test_a_damaged_packaged_file_is_refused(self):
    copy = self.create_tempdir().full_path
    for name in os.listdir(data.PACKAGED_MNIST_DIR):
      shutil.copy(os.path.join(data.PACKAGED_MNIST_DIR, name), copy)
    with open(os.path.join(copy, 't10k-labels-idx1-ubyte.gz'), 'r+b') as f:
      f.seek(100)
      f.write(b'x')
    with mock.patch.object(data, 'PACKAGED_MNIST_DIR', copy):
      with self.assertRaisesRegex(UserInputError, 't10k-labels-idx1-ubyte.gz does not match'):
        data.load('mnist', None)
    shutil.copy(os.path.join(data.PACKAGED_MNIST_DIR, 't10k-labels-idx1-ubyte.gz'), copy)
    os.remove(os.path.join(copy, 'train-images-idx3-ubyte.gz'))
    with mock.patch.object(data, 'PACKAGED_MNIST_DIR', copy):
      with self.assertRaisesRegex(UserInputError, 'incomplete.*train-images'):
        data.load('mnist', None)

  @parameterized.parameters('mnist', 'fashion_mnist')
  def test_tfds_path_offline(self, name):
    # tfds.testing.mock_data fakes the dataset (random images of the declared
    # shape and classes) without downloading anything.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    with tfds.testing.mock_data(num_examples=30):
      dataset = data.load_tfds(name)
      through_load = data.load(name, None) if name != 'mnist' else dataset
    self.assertEqual(dataset.train_images.shape, (30, 784))
    self.assertEqual(dataset.test_images.shape, (30, 784))
    self.assertEqual(dataset.train_images.dtype, np.float32)
    self.assertBetween(float(dataset.train_images.min()), 0.0, 1.0)
    self.assertBetween(float(dataset.train_images.max()), 0.0, 1.0)
    self.assertTrue(np.all((dataset.train_labels >= 0) & (dataset.train_labels < 10)))
    np.testing.assert_array_equal(through_load.train_labels, dataset.train_labels)
