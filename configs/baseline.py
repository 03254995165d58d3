"""The paper's Table 1 baseline: GQA, SwiGLU, RoPE, GPT-2 tokenizer, dropout 0.1 (at 50m).

Presets: tiny (CPU demo, the default), 10m, 50m, 100m: --config=configs/baseline.py:50m
"""

from stlm import config as config_lib


def get_config(arg: str = 'tiny'):
  c = config_lib.apply_preset(config_lib.base_config(), arg or 'tiny')
  c.name = 'baseline'
  # Decay like the original repository (nanoGPT configure_optimizers): every param of two or
  # more dimensions, the tied embedding included.
  c.train.weight_decay_params = 'ndim2'
  return c
