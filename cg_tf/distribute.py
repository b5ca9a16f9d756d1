"""Choosing the hardware: tf.distribute strategies, and what each replica does.

`make_strategy` builds the strategy a run trains under. The training step is
the same under every strategy (train.Experiment.train_step); the helpers here
are what it needs to know about the replica it runs on:

- every replica runs the forward and backward pass of the whole global
  minibatch (at the paper's B = 100 a small part of a winsorized step), so
  every replica holds the per-example factors of every example, with the
  bits a single device computes, and nothing is gathered;
- replica r winsorizes only its block of each layer's output columns and
  writes zeros elsewhere; plain SGD and the reference path are computed
  whole, and replica 0 alone contributes them;
- the optimizer's cross-replica sum then assembles the global update
  exactly, because x + 0 + ... + 0 = x: the numbers are those of one device,
  bit for bit on identical devices, while winsorizing is split N ways.

The only collectives are the optimizer's sum and the sum of clipped counts,
both in the replica function, never inside the XLA-compiled winsorization.
"""

import json
import os
from typing import Optional

import tensorflow as tf

from cg_tf.errors import UserInputError

STRATEGIES = ('default', 'mirrored', 'tpu', 'multiworker')


def make_strategy(name: str, cpu_replicas: int = 0, tpu: str = '') -> tf.distribute.Strategy:
  """The tf.distribute strategy called `name`.

  Args:
    name: 'default' (one device), 'mirrored' (all local GPUs, or
      `cpu_replicas` logical CPU devices), 'tpu' (a Cloud TPU), or
      'multiworker' (MultiWorkerMirroredStrategy configured from TF_CONFIG).
    cpu_replicas: with 'mirrored', split the CPU into this many logical
      devices and use them as replicas (testing on a laptop); 0 = GPUs.
      Must be called before TensorFlow initialises its devices.
    tpu: with 'tpu', 'local' on a TPU VM, or the TPU's name or grpc address.

  Returns:
    The strategy. TF32 is turned off for matrix products, so that sums that
    winsorization compares are computed in full float32 on GPUs and TPUs too.

  Raises:
    UserInputError: the hardware asked for is not there.
  """
  if name not in STRATEGIES:
    raise UserInputError(f'--strategy={name} must be one of {", ".join(STRATEGIES)}')
  if cpu_replicas and name != 'mirrored':
    raise UserInputError('--cpu_replicas needs --strategy=mirrored')
  tf.config.experimental.enable_tensor_float_32_execution(False)
  if name == 'default':
    return tf.distribute.get_strategy()
  if name == 'mirrored':
    if cpu_replicas:
      cpu = tf.config.list_physical_devices('CPU')[0]
      try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_replicas)])
      except RuntimeError:
        raise UserInputError('--cpu_replicas must be set before TensorFlow starts; it was '
                             'already initialised') from None
      devices = [d.name for d in tf.config.list_logical_devices('CPU')][:cpu_replicas]
      return tf.distribute.MirroredStrategy(devices)
    if not tf.config.list_physical_devices('GPU'):
      raise UserInputError('--strategy=mirrored found no GPU; use --cpu_replicas=N to test on '
                           'N logical CPU devices, or --strategy=default')
    return tf.distribute.MirroredStrategy()
  if name == 'tpu':
    try:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or 'local')
      tf.config.experimental_connect_to_cluster(resolver)
      tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, OSError, tf.errors.OpError) as e:
      reason = str(e).strip().split('. ')[0].splitlines()[0] if str(e).strip() else ''
      raise UserInputError(f'--strategy=tpu could not reach the TPU --tpu={tpu or "local"} '
                           f'({reason or type(e).__name__}); on a Cloud TPU VM use '
                           '--tpu=local') from None
    return tf.distribute.TPUStrategy(resolver)
  if not os.environ.get('TF_CONFIG'):
    raise UserInputError('--strategy=multiworker needs TF_CONFIG in the environment, naming '
                         'the cluster and this task (docs/cloud.md)')
  try:
    json.loads(os.environ['TF_CONFIG'])['cluster']
  except (ValueError, KeyError, TypeError):
    raise UserInputError('TF_CONFIG must be JSON with "cluster" and "task" (docs/cloud.md)'
                         ) from None
  return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the one task that writes summaries, examples.npz and checkpoints."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  return (task_type in (None, 'chief') or
          (task_type == 'worker' and task_id == 0 and
           'chief' not in resolver.cluster_spec().as_dict()))


def task_id(strategy: tf.distribute.Strategy) -> int:
  """This worker's index among the workers; 0 without a cluster."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  return int(resolver.task_id or 0) if resolver is not None else 0


def replica_id() -> tf.Tensor:
  """int32 scalar: this replica's index in its sync group (0 outside strategy.run)."""
  return tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int32)


def num_replicas() -> int:
  """Replicas in sync, from inside or outside strategy.run."""
  context = tf.distribute.get_replica_context()
  if context is None:
    return tf.distribute.get_strategy().num_replicas_in_sync
  return context.num_replicas_in_sync


def sum_over_replicas(value: tf.Tensor) -> tf.Tensor:
  """The sum of `value` over all replicas, on every replica."""
  if num_replicas() == 1:
    return value
  return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, value)


def own_columns(width: int) -> Optional[tf.Tensor]:
  """int32 [k]: the columns of `width` that this replica winsorizes, -1 for padding.

  Replica r owns columns r * k to (r + 1) * k - 1, k = ceil(width / N); None
  with one replica (all columns, nothing to pad).
  """
  n = num_replicas()
  if n == 1:
    return None
  k = -(-width // n)
  columns = replica_id() * k + tf.range(k)
  return tf.where(columns < width, columns, -tf.ones_like(columns))


def place_columns(block: tf.Tensor, width: int) -> tf.Tensor:
  """`block` [..., k] at this replica's columns of [..., width], zeros elsewhere."""
  n = num_replicas()
  if n == 1:
    return block
  k = block.shape[-1]
  position = tf.range(width)
  spread = tf.gather(block, position % k, axis=-1)
  return tf.where(tf.equal(position // k, replica_id()), spread, tf.zeros_like(spread))


def only_first_replica(value):
  """`value` (a tensor or tf.IndexedSlices) on replica 0 and zeros elsewhere: the cross-replica
  sum is then `value` exactly."""
  if num_replicas() == 1:
    return value
  if isinstance(value, tf.IndexedSlices):
    return tf.IndexedSlices(only_first_replica(value.values), value.indices, value.dense_shape)
  return tf.where(tf.equal(replica_id(), 0), value, tf.zeros_like(value))


def runs_on_cpus(strategy: tf.distribute.Strategy) -> bool:
  """True when every replica of `strategy` computes on a CPU (no GPU or TPU does the work)."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return False
  try:
    devices = strategy.extended.worker_devices
  except RuntimeError:  # the default strategy: TensorFlow places ops on a GPU if there is one
    return not tf.config.list_logical_devices('GPU')
  return all(tf.DeviceSpec.from_string(device).device_type == 'CPU' for device in devices)


def checkpoint_dir(workdir: str, strategy: tf.distribute.Strategy) -> str:
  """Where this task saves checkpoints: the run's, or a scratch one for a non-chief worker.

  Every MultiWorkerMirroredStrategy worker must take part in a save; only the
  chief's copy is kept (tensorflow.org's multi-worker custom-loop guide).
  """
  path = os.path.join(workdir, 'checkpoints')
  return path if is_chief(strategy) else os.path.join(path, f'worker_{task_id(strategy)}_tmp')


def describe(strategy: Optional[tf.distribute.Strategy]) -> str:
  """The strategy in a few words for the log."""
  strategy = strategy or tf.distribute.get_strategy()
  if not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
    return 'on one device'
  return f'on {strategy.num_replicas_in_sync} replicas ({type(strategy).__name__})'
