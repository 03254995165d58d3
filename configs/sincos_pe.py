"""Table 2 row: sinusoidal absolute positions instead of RoPE.

Presets: tiny (CPU demo, the default), 10m, 50m, 100m: --config=configs/sincos_pe.py:50m
"""

from stlm import config as config_lib


def get_config(arg: str = 'tiny'):
  c = config_lib.apply_preset(config_lib.base_config(), arg or 'tiny')
  c.name = 'sincos_pe'
  # Decay like the original repository (nanoGPT configure_optimizers): every param of two or
  # more dimensions, the tied embedding included.
  c.train.weight_decay_params = 'ndim2'
  c.model.position = 'sincos'
  return c
