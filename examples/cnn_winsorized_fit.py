"""A convolutional network on MNIST, trained with winsorized SGD through Keras' own fit.

  python examples/cnn_winsorized_fit.py                  # 60,000 examples, 3 epochs, c = 2
  python examples/cnn_winsorized_fit.py --noise=0.5 --winsor_c=4 --epochs=10

Any Keras model works the same way: wrap it with cg_tf.keras.with_aggregator,
then compile and fit it as usual. Half of the labels can be shuffled
(--noise) to watch winsorization hold memorisation down: the training
accuracy on the noisy labels stays near the share of labels left correct,
while the test accuracy stays high.

The callback cg_tf.keras.TrainingSetRecord measures what run.py measures, on
the authors' log-spaced steps: when each example is learned, pristine and
corrupt accuracy (as TensorBoard scalars with --logdir), and forgetting. The
script ends by printing, for the pristine and the corrupt examples, the
median step from which they stay fitted: the Coherent Gradients hypothesis
says the pristine ones come first.
"""

import argparse

import keras
import numpy as np

import cg_tf.keras
from cg_tf import aggregators
from cg_tf import data
from cg_tf import learning


def convolutional_network() -> keras.Model:
  """A small CNN of one's own: Conv2D 32 3x3, max-pool, Conv2D 64 3x3, max-pool, Dense 128, 10."""
  return keras.Sequential([
      keras.Input((28, 28, 1)),
      keras.layers.Conv2D(32, 3, activation='relu'),
      keras.layers.MaxPooling2D(2),
      keras.layers.Conv2D(64, 3, activation='relu'),
      keras.layers.MaxPooling2D(2),
      keras.layers.Flatten(),
      keras.layers.Dense(128, activation='relu'),
      keras.layers.Dense(10),
  ])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--winsor_c', type=float, default=2.0, help='winsorization percentile c')
  parser.add_argument('--noise', type=float, default=0.0, help='share of labels shuffled')
  parser.add_argument('--epochs', type=int, default=3)
  parser.add_argument('--batch_size', type=int, default=100)
  parser.add_argument('--train_size', type=int, default=0, help='examples to train on; 0: all')
  parser.add_argument('--learning_rate', type=float, default=0.1)
  parser.add_argument('--logdir', default=None, help='TensorBoard scalars of the record go here')
  args = parser.parse_args()

  # The original MNIST files ship with cg_tf; make_noisy takes a fixed subset
  # and shuffles the labels of a `noise` share of it.
  noisy = data.make_noisy(data.load_packaged_mnist(), args.train_size, args.noise, noise_seed=0)
  x_train = noisy.data.train_images.reshape(-1, 28, 28, 1)
  x_test = noisy.data.test_images.reshape(-1, 28, 28, 1)
  keras.utils.set_random_seed(0)

  model = cg_tf.keras.with_aggregator(convolutional_network(),
                                      aggregators.get('winsorize', c=args.winsor_c))
  model.compile(optimizer=keras.optimizers.SGD(args.learning_rate),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=['accuracy'])
  record = cg_tf.keras.TrainingSetRecord(
      x_train, noisy.train_labels, noisy.data.train_labels, (x_test, noisy.data.test_labels),
      args.noise, log_dir=args.logdir)
  model.fit(x_train, noisy.train_labels, batch_size=args.batch_size, epochs=args.epochs,
            validation_data=(x_test, noisy.data.test_labels), callbacks=[record], verbose=2)

  predicted = np.argmax(model.predict(x_train, verbose=0), axis=-1)
  corrupt = noisy.corrupt
  print(f'train accuracy on the training labels: {np.mean(predicted == noisy.train_labels):.4f}')
  if corrupt.any():
    print(f'corrupt labels fitted: {np.mean(predicted[corrupt] == noisy.train_labels[corrupt]):.4f}'
          f' of {corrupt.sum()}')
  # -1 (not fitted at the end) counts as later than every step: 'inf'.
  learned_since_step = record.examples_record()['learned_since_step']
  for group, mask in (('pristine', ~corrupt), ('corrupt', corrupt)):
    if mask.any():
      print(f'{group} examples: median step from which they stay fitted: '
            f'{learning.median_step(learned_since_step[mask]):g}')
  _, test_accuracy = model.evaluate(x_test, noisy.data.test_labels, verbose=0)
  print(f'test accuracy: {test_accuracy:.4f}')


if __name__ == '__main__':
  main()
