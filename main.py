"""Train a super tiny language model: python main.py --config=configs/byte_pool.py[:preset].

Multi-process (pod slice, multi-node GPUs): run the same command on every host, adding
--coordinator_address/--num_processes/--process_id where jax cannot detect them (docs/scaling.md).
"""

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags


def _verbose(argv) -> bool:
  """--verbosity/-v >= 1 asks for tracebacks even for bad input (flags are not parsed yet)."""
  for i, a in enumerate(argv):
    m = re.fullmatch(r'--?(?:verbosity|v)(?:=(-?\d+))?', a)
    if m:
      value = m.group(1) or (argv[i + 1] if i + 1 < len(argv) else '0')
      return value.lstrip('-').isdigit() and int(value) >= 1
  return False


def _bad_flag(e: BaseException) -> None:
  """Exits with one line for a flag that cannot work (a traceback with --verbosity=1)."""
  if _verbose(sys.argv):
    raise e
  text = str(e)
  # ml_collections reports a misspelled override as the repr of a KeyError with a hint.
  key = re.search(r"\\?'(\w+)\\?'", text)
  hint = re.search(r'Did you mean "([^"]+)"', text)
  if isinstance(e, (AttributeError, KeyError)) and key:
    flag = next((a.split('=')[0] for a in sys.argv[1:]
                 if a.startswith('--config.') and a.split('=')[0].endswith('.' + key.group(1))),
                f'--config...{key.group(1)}')
    text = f'{flag}: the config has no key {flag[len("--config."):]!s}' + (
        f'; did you mean {hint.group(1)}?' if hint else '')
  else:
    # The innermost reason (e.g. a missing file, an unknown preset), without the stack.
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    reasons = [l for l in lines if re.match(r'(\w+Error|\[Errno \d+\])', l)]
    text = ' '.join(reasons[-1:] or lines[:1]) or type(e).__name__
    text = re.sub(r'^\w+Error: ', '', text)
    flag = next((a for a in sys.argv[1:] if a.startswith('--config=')), None)
    if flag and flag.split('=', 1)[1] not in text:
      text = f'{flag}: {text}'
  sys.exit(f'error: {text}')


try:
  config_flags.DEFINE_config_file('config', 'configs/byte_pool.py',
                                  'Experiment config file[:preset].', lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as err:  # a bad --config.* override
  _bad_flag(err)
flags.DEFINE_string('workdir', None, 'Run directory (default runs/<name>_<preset>); resumes if it '
                    'holds checkpoints of the same config.')
flags.DEFINE_string('coordinator_address', None, 'Multi-process runs: host:port of process 0 '
                    '(else $JAX_COORDINATOR_ADDRESS; auto-detected on Cloud TPU, SLURM, Open MPI).')
flags.DEFINE_integer('num_processes', None, 'Multi-process runs: number of processes (else '
                     '$JAX_NUM_PROCESSES or auto-detected); 1 forces a single-process run.')
flags.DEFINE_integer('process_id', None, 'Multi-process runs: this process, 0..num_processes-1 '
                     '(else $JAX_PROCESS_ID or auto-detected).')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and tfds log every file at INFO
  # pylint: disable=g-import-not-at-top  (fast --help; distributed must start before devices)
  from stlm.train import distributed
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from stlm.config import validate as config_validate
  from stlm.data import corpus
  from stlm.train import checkpoint
  from stlm.train import disk
  from stlm.train import divergence
  from stlm.train import lease
  from stlm.train import loop
  try:
    config = FLAGS.config
    config.name  # pylint: disable=pointless-statement  (a failed load raises on first use)
  except (OSError, ValueError, AttributeError, KeyError) as e:  # config file failed to load
    _bad_flag(e)
  workdir = FLAGS.workdir or os.path.join('runs', f'{config.name}_{config.preset}')
  try:
    loop.train(config, workdir, config_flags.get_config_filename(FLAGS['config']))
  except (config_validate.ConfigError, corpus.CorpusError, checkpoint.CheckpointMismatchError,
          checkpoint.DamagedCheckpointError, divergence.DivergenceError,
          lease.LeaseHeldError, disk.DiskSpaceError, checkpoint.CheckpointWriteError) as e:
    # Bad input or a diverged run, not a bug: the message says what and where; a traceback
    # would bury it (--verbosity=1 shows it).
    if FLAGS.verbosity >= 1:
      raise
    sys.exit(f'error: {e}')


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _bad_flag(e)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
