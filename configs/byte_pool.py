"""The byte-pool model (paper Section 5.2): byte encoder, BPE-boundary pooling, byte decoder.

Presets: tiny (CPU demo on the built-in corpus, the default), 10m, 50m, 100m:
  --config=configs/byte_pool.py:50m
The tokenizer (GPT-2 by default, any `tokenizer.kind` works) only supplies chunk boundaries.

Version: v2 (ragged byte stream, local window encoder and decoder; stlm/models/byte_pool/v2.py)
by default, with the decoder whose only view across chunks is the core (decoder_context
'chunk', the core cross-attended before every decoder block) and slot-concat pooling: the
row core_chunk_slots of stlm/experiments/rows.py, chosen in the comparison of
results/2026-12-02-byte-pool-core.md for making the core carry the context. The paper's
version: --config.model.byte_pool.version=paper.

Cores: the byte encoder + decoder replace the baseline's vocab x hidden embedding (25.7M of
the baseline's 50M at 50m), so at the baseline's core a byte-pool model would be about half
its preset's size. Each preset therefore deepens (or, at 10m, widens) the core until the
TOTAL is within 10% of the preset's name (tests/test_byte_pool.py and test_byte_pool_v2.py
check totals and the 90% budget). Parameters, from factory.abstract_params:
  preset  byte enc + dec (v2 / paper)  core      total (v2)  baseline embed+head at this width
  tiny    319K / 238K                  98.6K     417K        3.22M  (v2: 90.1% fewer)
  10m     770K / 665K                  9.43M     10.20M      16.1M  (95.2% fewer)
  50m     1.00M / 886K                 48.25M    49.25M      25.7M  (96.1% fewer)
  100m    3.19M / 2.89M                100.7M    103.9M      38.6M  (91.7% fewer)
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
    # One byte layer each way, 64 wide (a second decoder layer would pass the 90% budget of
    # tiny's 64-wide core).
    'tiny': dict(byte_dim=64, encoder_layers=1, encoder_heads=4, encoder_ffn_dim=256,
                 decoder_layers=1, decoder_heads=4, decoder_ffn_dim=256),
    '10m': dict(byte_dim=64, encoder_layers=2, encoder_heads=4, encoder_ffn_dim=256,
                decoder_layers=2, decoder_heads=4, decoder_ffn_dim=256),
    '50m': dict(byte_dim=64, encoder_layers=2, encoder_heads=4, encoder_ffn_dim=256,
                decoder_layers=2, decoder_heads=4, decoder_ffn_dim=256),
    '100m': dict(byte_dim=128, encoder_layers=2, encoder_heads=4, encoder_ffn_dim=512,
                 decoder_layers=2, decoder_heads=4, decoder_ffn_dim=512),
}


# v2 with the decoder whose only view across chunks is the core: each byte sees its own
# chunk's earlier bytes, the core cross-attends before every decoder block (two blocks), and
# the core reads each chunk as its slots' states concatenated and projected (the row
# core_chunk_slots of stlm/experiments/rows.py).
_DECODER = dict(version='v2', condition='cross_attention', decoder_context='chunk',
                condition_at='every_layer', pooling='slots')


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
  c.model.byte_pool.update(_DECODER)
  return c
