"""The byte-pool model (paper Section 5.2): byte encoder, BPE-boundary pooling, byte decoder.

Presets: tiny (CPU demo on the built-in corpus, the default), 10m, 50m, 100m:
  --config=configs/byte_pool.py:50m
The tokenizer (GPT-2 by default, any `tokenizer.kind` works) only supplies chunk boundaries.

Version: v2 (ragged byte stream, local window encoder and decoder; stlm/models/byte_pool/v2.py)
by default, its decoder cross-attending to the last 4 core outputs (condition
'cross_attention'): the best row of the equal-core comparison (python -m
stlm.experiments.equal_core; results/2026-11-30-byte-pool.md). The paper's version:
--config.model.byte_pool.version=paper (the sizes below are its; v2's byte parts, with n-gram
and slot embeddings and the cross-attention, are 253K / 434K / 470K / 1.58M: 92.1-98.2% fewer
than embed + head).

Cores: the byte encoder + decoder replace the baseline's vocab x hidden embedding (25.7M of
the baseline's 50M at 50m), so at the baseline's core a byte-pool model would be about half
its preset's size. Each preset therefore deepens (or, at 10m, widens) the core until the
TOTAL is within 10% of the preset's name. Measured (tests/test_byte_pool.py checks them):
  preset  byte enc + dec  core      total     baseline embed+head at this width
  tiny    173K            98.6K     271K      3.22M  (94.6% fewer)
  10m     337K            9.43M     9.76M     16.1M  (97.9% fewer; 8.04M at the baseline's 160)
  50m     361K            48.25M    48.61M    25.7M  (98.6% fewer)
  100m    1.31M           100.7M    102.0M    38.6M  (96.6% fewer)
"""

from stlm import config as config_lib

# Core overrides on top of the baseline preset of the same name, and byte-level sizes.
_CORES = {
    'tiny': dict(max_len=96),  # 96 chunks ~ 360 bytes of context; a few CPU minutes
    '10m': dict(num_layers=8, hidden_dim=320, num_heads=8, num_kv_heads=2, ffn_dim=960),
    '50m': dict(num_layers=16),   # the baseline's 512-wide core, 16 deep instead of 8
    '100m': dict(num_layers=16),  # the baseline's 768-wide core, 16 deep instead of 10
}
_BYTES = {
    # One byte layer each way, 64 wide.
    'tiny': dict(byte_dim=64, encoder_layers=1, encoder_heads=4, encoder_ffn_dim=256,
                 decoder_layers=1, decoder_heads=4, decoder_ffn_dim=256),
    '10m': dict(byte_dim=64, encoder_layers=2, encoder_heads=4, encoder_ffn_dim=256,
                decoder_layers=2, decoder_heads=4, decoder_ffn_dim=256),
    '50m': dict(byte_dim=64, encoder_layers=2, encoder_heads=4, encoder_ffn_dim=256,
                decoder_layers=2, decoder_heads=4, decoder_ffn_dim=256),
    '100m': dict(byte_dim=128, encoder_layers=2, encoder_heads=4, encoder_ffn_dim=512,
                 decoder_layers=2, decoder_heads=4, decoder_ffn_dim=512),
}


def get_config(arg: str = 'tiny'):
  preset = arg or 'tiny'
  c = config_lib.apply_preset(config_lib.base_config(), preset)
  c.name = 'byte_pool'
  # Decay like the original repository (nanoGPT configure_optimizers): every param of two or
  # more dimensions, the tied embedding included.
  c.train.weight_decay_params = 'ndim2'
  c.model.kind = 'byte_pool'
  c.model.update(_CORES[preset])
  c.model.byte_pool.update(_BYTES[preset])
  c.model.byte_pool.version = 'v2'
  c.model.byte_pool.condition = 'cross_attention'
  return c
