"""Metrics out of the train loop: metrics.jsonl, TensorBoard events, a progress bar, MFU."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from stlm.models import kinds

# Dense bf16 peak FLOP/s per chip, from vendor data sheets; MFU is relative to these.
_PEAK_FLOPS = {
    'h100': 989e12, 'h200': 989e12, 'a100': 312e12, 'l4': 121e12, 'a10': 125e12,
    'tpu v4': 275e12, 'tpu v5 lite': 197e12, 'tpu v5e': 197e12, 'tpu v5': 459e12,
    'tpu v6 lite': 918e12, 'tpu v6e': 918e12,
}


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


def peak_flops_per_device() -> tuple[float, str]:
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in _PEAK_FLOPS.items():
    if name in kind:
      return flops, f'{kind} data sheet bf16'
  return measured_matmul_flops(), f'{kind} measured f32 matmul'


def flops_per_unit(config, breakdown: dict) -> float:
  """Training FLOPs per target (token or chunk), as the model kind counts them."""
  return kinds.get_kind(config.model.kind).flops_per_target(config.model, breakdown)


class MetricsWriter:
  """Appends to <workdir>/metrics.jsonl and TensorBoard; silent on processes other than 0."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                          desc='train', mininterval=1.0)

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': step, 'split': split, **clean}) + '\n')
    self._jsonl.flush()
    for k, v in clean.items():
      self._tb.add_scalar(f'{split}/{k}', v, step)

  def progress(self, step: int, postfix: dict) -> None:
    if self.enabled and self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)

  def message(self, text: str) -> None:
    if self.enabled:
      tqdm.tqdm.write(text)

  def end_progress(self) -> None:
    if self.enabled and self._bar is not None:
      self._bar.close()
      self._bar = None

  def close(self) -> None:
    if self.enabled:
      self.end_progress()
      self._tb.close()
      self._jsonl.close()
