"""Train a super tiny language model: python main.py --config=configs/byte_pool.py[:preset].

Multi-process (pod slice, multi-node GPUs): run the same command on every host, adding
--coordinator_address/--num_processes/--process_id where jax cannot detect them (docs/scaling.md).
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from stlm import cli_errors

try:
  config_flags.DEFINE_config_file('config', 'configs/byte_pool.py',
                                  'Experiment config file[:preset].', lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as err:  # a bad --config.* override
  cli_errors.exit_for_config_flag(err)
flags.DEFINE_string('workdir', None, 'Run directory (default runs/<name>_<preset>); resumes if it '
                    'holds checkpoints of the same config.')
flags.DEFINE_string('coordinator_address', None, 'Multi-process runs: host:port of process 0 '
                    '(else $JAX_COORDINATOR_ADDRESS; auto-detected on Cloud TPU, SLURM, Open MPI).')
flags.DEFINE_integer('num_processes', None, 'Multi-process runs: number of processes (else '
                     '$JAX_NUM_PROCESSES or auto-detected); 1 forces a single-process run.')
flags.DEFINE_integer('process_id', None, 'Multi-process runs: this process, 0..num_processes-1 '
                     '(else $JAX_PROCESS_ID or auto-detected).')
flags.DEFINE_integer('heartbeat_timeout', 100, 'Multi-process runs: seconds without a heartbeat '
                     'after which the others count a process as dead and stop (jax\'s default).')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and tfds log every file at INFO
  # pylint: disable=g-import-not-at-top  (fast --help; distributed must start before devices)
  from stlm.train import distributed
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         heartbeat_timeout=FLAGS.heartbeat_timeout)
  from stlm.train import checkpoint
  from stlm.train import disk
  from stlm.train import divergence
  from stlm.train import lease
  from stlm.train import loop
  try:
    config = FLAGS.config
    config.name  # pylint: disable=pointless-statement  (a failed load raises on first use)
  except (OSError, ValueError, AttributeError, KeyError) as e:  # config file failed to load
    cli_errors.exit_for_config_flag(e)
  workdir = FLAGS.workdir or os.path.join('runs', f'{config.name}_{config.preset}')
  # Bad input or a diverged run, not a bug: the message says what and where; a traceback
  # would bury it (--verbosity=1 shows it).
  with cli_errors.one_line_errors(checkpoint.CheckpointMismatchError,
                                  checkpoint.DamagedCheckpointError, divergence.DivergenceError,
                                  lease.LeaseHeldError, disk.DiskSpaceError,
                                  checkpoint.CheckpointWriteError):
    from stlm.train import population
    if population.enabled(config):
      from stlm.train import population_loop
      population_loop.train(config, workdir, config_flags.get_config_filename(FLAGS['config']))
    else:
      loop.train(config, workdir, config_flags.get_config_filename(FLAGS['config']))


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    cli_errors.exit_for_config_flag(e)


if __name__ == '__main__':
  cli_errors.run(main, flags_parser=_parse_flags)
