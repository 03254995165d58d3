"""Joining a multi-process run through JAX's own distributed runtime (jax.distributed).

Call `initialize` once per process before anything touches devices. Settings come from the
arguments (main.py's --coordinator_address, --num_processes, --process_id), else from the
environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), else from the
cluster itself: Cloud TPU VMs (pod slices, GKE) and multi-task SLURM / Open MPI jobs are
detected by jax. With none of these, or --num_processes=1, the run stays single-process.
"""

import dataclasses
import logging
import os
from typing import Mapping

from absl import logging as absl_logging
import jax

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'  # also read by jax.distributed itself
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


@dataclasses.dataclass(frozen=True)
class Settings:
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in dataclasses.astuple(self))


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name, '').strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'environment variable {name}={value!r} is not an integer') from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
  """Arguments first, then the environment; checks what was given is complete and sane."""
  s = Settings(coordinator_address or environ.get(ENV_COORDINATOR) or None,
               num_processes if num_processes is not None else _int_env(environ,
                                                                         ENV_NUM_PROCESSES),
               process_id if process_id is not None else _int_env(environ, ENV_PROCESS_ID))
  if s.num_processes is not None and s.num_processes < 1:
    raise ValueError(f'--num_processes={s.num_processes} must be >= 1')
  if s.num_processes == 1:
    return s
  if s.explicit:
    missing = [f'--{flag} (or ${env})' for flag, env, value in (
        ('coordinator_address', ENV_COORDINATOR, s.coordinator_address),
        ('num_processes', ENV_NUM_PROCESSES, s.num_processes),
        ('process_id', ENV_PROCESS_ID, s.process_id)) if value is None]
    if missing:
      raise ValueError('multi-process run: also set ' + ', '.join(missing) +
                       f' (given: {s})')
    if ':' not in s.coordinator_address:
      raise ValueError(f'--coordinator_address={s.coordinator_address!r} needs host:port, '
                       'e.g. 10.0.0.2:1234 (process 0 listens on that port)')
    if not 0 <= s.process_id < s.num_processes:
      raise ValueError(f'--process_id={s.process_id} must be in [0, --num_processes='
                       f'{s.num_processes})')
  return s


def _cluster_detected(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether jax.distributed can find its settings itself (Cloud TPU, SLURM, Open MPI)."""
  if int(environ.get('SLURM_NTASKS', '1') or 1) > 1:
    return True
  if int(environ.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return True
  if environ.get('TPU_WORKER_HOSTNAMES') or environ.get('TPU_PROCESS_ADDRESSES') or \
      environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True
  try:  # jax's own check (PCI vendor id of a TPU); private, hence guarded.
    from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
    return bool(cloud_tpu_cluster.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, initialization_timeout: int = 300,
               heartbeat_timeout: int = 100,
               environ: Mapping[str, str] = os.environ) -> bool:
  """Starts jax.distributed if this is a multi-process run; True if it did."""
  s = resolve(coordinator_address, num_processes, process_id, environ)
  if s.num_processes == 1:
    return False
  if not s.explicit and not _cluster_detected(environ):
    return False
  # CPU processes exchange collectives over gloo; without it, cross-process CPU
  # computations fail. (Already the default in recent jax; mpi stays if the user chose it.)
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(s.coordinator_address, s.num_processes, s.process_id,
                               initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout)
  except RuntimeError as e:
    raise RuntimeError(f'jax.distributed.initialize({s}) failed; it must run before anything '
                       f'touches devices: {e}') from e
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  if jax.process_index() != 0:
    # Process 0 speaks for the run (messages, progress bar, metrics); the others' library
    # INFO lines (Orbax, grain, tfds) would only repeat it N times. Warnings still show.
    absl_logging.set_verbosity(absl_logging.WARNING)
  return True


def is_main_process() -> bool:
  """Process 0: the one that logs, prints progress and writes single-writer files."""
  return jax.process_index() == 0
