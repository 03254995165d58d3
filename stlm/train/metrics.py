"""Metrics out of the train loop: metrics.jsonl, TensorBoard events (and W&B when configured), a
progress bar, MFU."""

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from stlm.data import phases as phases_lib
from stlm.models import kinds
from stlm.train import wandb_writer

# Dense bf16 peak FLOP/s per chip, from vendor data sheets; MFU is relative to these.
_PEAK_FLOPS = {
    # 'l40' before 'l4' and 'a100' before 'a10': the first substring match of the kind wins.
    'h100': 989e12, 'h200': 989e12, 'a100': 312e12, 'l40s': 362e12, 'l40': 181e12,
    'l4': 121e12, 'a10': 125e12,
    'tpu v4': 275e12, 'tpu v5 lite': 197e12, 'tpu v5e': 197e12, 'tpu v5': 459e12,
    'tpu v6 lite': 918e12, 'tpu v6e': 918e12,
}
PEAK_FLOPS = _PEAK_FLOPS


def measured_matmul_flops(n: int = 512, reps: int = 8) -> float:
  """FLOP/s of a float32 matmul on device 0: the honest peak where no data sheet applies (CPU)."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(reps):
    y = f(x)
  y.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - start)


_IMPORTED_AT = time.time()


def seconds_since_process_start() -> float:
  """Wall seconds since this process started (Linux /proc), else since this module's import."""
  try:
    with open('/proc/self/stat', encoding='ascii') as f:
      # Field 22 (after the parenthesised command name, which may hold spaces): start time in
      # clock ticks after boot.
      start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime', encoding='ascii') as f:
      uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    return time.time() - _IMPORTED_AT


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch when it is installed (to accept torch tensors), which costs
  ~6 s of every run's start-up; the loop logs Python floats only. A None entry in
  sys.modules makes that optional import fail fast; it is removed again right after, so a
  later `import torch` in this process works as usual.
  """
  blocked = 'torch' not in sys.modules
  if blocked:
    sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if blocked:
      del sys.modules['torch']
  return SummaryWriter


def peak_flops_per_device() -> tuple[float, str]:
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in _PEAK_FLOPS.items():
    if name in kind:
      return flops, f'{kind} data sheet bf16'
  return measured_matmul_flops(), f'{kind} measured f32 matmul'


def flops_per_unit(config, breakdown: dict) -> float:
  """Training FLOPs per target (token or chunk), as the model kind counts them."""
  return kinds.get_kind(config.model.kind).flops_per_target(config.model, breakdown)


def _json_value(v):
  """NaN and inf become None (JSON null): bare NaN is not JSON."""
  v = float(np.asarray(v))
  return v if math.isfinite(v) else None


def truncate_jsonl(path: str, last_step: int) -> int:
  """Keeps only the rows of `path` with step <= last_step (and parseable); returns rows dropped.

  Run at start-up: after a resume from the checkpoint of step s, the rows a killed run wrote
  past s are about to be written again, so each step must appear once. The file is rewritten
  to a temporary name and renamed over the old one, so a kill here loses nothing.
  """
  if not os.path.exists(path):
    return 0
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a row cut short by a kill mid-write
    if isinstance(row, dict) and isinstance(row.get('step'), int) and row['step'] <= last_step:
      kept.append(line)
  if len(kept) == len(lines):
    return 0
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(''.join(line + '\n' for line in kept))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return len(lines) - len(kept)


class MetricsWriter:
  """Writes <workdir>/metrics.jsonl and TensorBoard; silent on processes other than 0.

  A run that starts at step s (0 = fresh) first drops whatever an earlier, killed run logged
  after s: rows of metrics.jsonl past s (the step-0 rows too when s is 0, since step 0 is
  evaluated again), and TensorBoard events at steps > s via tensorboardX's purge_step, which
  writes a marker that makes TensorBoard hide the older events at steps >= purge_step.

  With `config.train.wandb_project` set, every scalar also goes to a W&B run
  (stlm/train/wandb_writer.py, which explains its resume and step policy); `identity` (the
  run's name, git state, host... from run.json) goes into that run's config. Used as a
  context manager, an exception closes the writer too and marks the W&B run failed.
  """

  def __init__(self, workdir: str, total_steps: int, initial_step: int, enabled: bool = True,
               config=None, identity: dict | None = None,
               phases: list[phases_lib.Phase] = ()):
    """phases: the run's data phases (default: `config.data.phases`); each row then carries
    its step's `phase` (index) and `phase_name` (the phase's sources as written)."""
    self.enabled = enabled and jax.process_index() == 0
    if not phases and config is not None:
      phases = phases_lib.parse(config.data.get('phases', '') or '')
    self._phases = list(phases)
    self._jsonl = None
    self._tb = None
    self._bar = None
    self._wandb = None
    self._closed = False
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # First: a W&B run that cannot start leaves no other output open.
    wandb = wandb_writer.import_wandb(config) if config is not None else None
    if wandb is not None:
      self._wandb = wandb_writer.WandbWriter(wandb, workdir, config, identity, log=self.message)
    self.jsonl_path = os.path.join(workdir, 'metrics.jsonl')
    self.tb_dir = os.path.join(workdir, 'tensorboard')
    truncate_jsonl(self.jsonl_path, initial_step if initial_step else -1)
    self._jsonl = open(self.jsonl_path, 'a', encoding='utf-8')
    self._tb = _summary_writer_class()(self.tb_dir, purge_step=initial_step + 1 if initial_step else 0)
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                          desc='train', mininterval=1.0)

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: _json_value(v) for k, v in metrics.items()}
    tags = {}
    if self._phases:
      phase = phases_lib.phase_at(self._phases, step)
      tags = {'phase': phase.index, 'phase_name': phase.label}
    # time: wall-clock seconds since the epoch, for curves against wall time (stlm.report).
    self._jsonl.write(json.dumps({'step': step, 'split': split, 'time': round(time.time(), 3),
                                  **tags, **clean}, allow_nan=False) + '\n')
    self._jsonl.flush()
    scalars = {k: float('nan') if v is None else v for k, v in clean.items()}
    for k, v in scalars.items():
      self._tb.add_scalar(f'{split}/{k}', v, step)
    if self._wandb is not None:
      self._wandb.write(step, split, scalars)

  def progress(self, step: int, postfix: dict) -> None:
    """Moves the bar to `step`, showing this interval's values (set before the redraw)."""
    if self.enabled and self._bar is not None:
      self._bar.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)
      self._bar.update(step - self._bar.n)

  def message(self, text: str) -> None:
    if self.enabled:
      tqdm.tqdm.write(text)

  def end_progress(self) -> None:
    if self.enabled and self._bar is not None:
      self._bar.close()
      self._bar = None

  @property
  def wandb_run_id(self) -> str | None:
    return self._wandb.run_id if self._wandb is not None else None

  def close(self, failed: bool = False) -> None:
    """Closes every output once (later calls do nothing); failed: the run ended by an error."""
    if self.enabled and not self._closed:
      self._closed = True
      self.end_progress()
      self._tb.close()
      self._jsonl.close()
      if self._wandb is not None:
        self._wandb.close(failed=failed)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    self.close(failed=exc_type is not None)
