"""Table 2 row: GeLU FFN (2304 at 50m), parameter-matched to SwiGLU 1536 (2*d*f = 3*d*f').

Presets: tiny (CPU demo, the default), 10m, 50m, 100m: --config=configs/simple_ffn.py:50m
"""

from stlm import config as config_lib


def get_config(arg: str = 'tiny'):
  c = config_lib.apply_preset(config_lib.base_config(), arg or 'tiny')
  c.name = 'simple_ffn'
  # Decay like the original repository (nanoGPT configure_optimizers): every param of two or
  # more dimensions, the tied embedding included.
  c.train.weight_decay_params = 'ndim2'
  c.model.ffn_type = 'gelu'
  c.model.ffn_dim = c.model.ffn_dim * 3 // 2
  return c
