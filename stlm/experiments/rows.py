"""The rows of the byte-pool comparisons: name -> (config file, model.byte_pool overrides).

Shared by the equal-core quality comparison (stlm/experiments/equal_core.py) and the speed
benchmark (benchmarks/byte_pool_speed.py), so a name means the same model in both.
"""

import os

from stlm.config import files

baseline_config, byte_pool_config = 'baseline.py', 'byte_pool.py'

# name -> (config file in the configs folder, model.byte_pool overrides); v2 rows add one
# ingredient at a time. Every row pins its decoder conditioning, so that a row keeps measuring
# the same model when configs/byte_pool.py's defaults move on: 'v2' has slot embeddings and one
# core vector added after the decoder's first attention, 'v2_cross' cross-attends to the core.
# The ablation rows of the first v2 design pin its conditioning (no slot embeddings, core
# output added at the decoder input).
_V2 = dict(version='v2', condition='add')
_V2_FIRST = dict(_V2, slot_embedding=False, condition_at='input')
_CHUNK_ONLY = dict(encoder_context='chunk', decoder_context='chunk', ngram_buckets=0)
ROWS = {
    'baseline': (baseline_config, None),
    'paper': (byte_pool_config, dict(version='paper')),
    'v2': (byte_pool_config, _V2),
    'v2_cross': (byte_pool_config, dict(version='v2', condition='cross_attention')),
    # More local capacity for spelling out the next chunk from the core: a second decoder
    # layer; local models 96 wide (1 decoder layer: 'w96'; 2: 'wide', just over a 90%
    # parameter saving against embed + head at a 128-wide core).
    'v2_cross_dec2': (byte_pool_config, dict(version='v2', condition='cross_attention',
                                             decoder_layers=2)),
    'v2_cross_w96': (byte_pool_config, dict(version='v2', condition='cross_attention',
                                            byte_dim=96, encoder_ffn_dim=384,
                                            decoder_ffn_dim=384)),
    'v2_cross_wide': (byte_pool_config, dict(version='v2', condition='cross_attention',
                                             byte_dim=96, decoder_layers=2, encoder_ffn_dim=384,
                                             decoder_ffn_dim=384)),
    # The ingredients of v2's conditioning, one removed at a time.
    'v2_first': (byte_pool_config, _V2_FIRST),
    'v2_no_slots': (byte_pool_config, dict(_V2, slot_embedding=False)),
    'v2_cond_at_input': (byte_pool_config, dict(_V2, condition_at='input')),
    'v2_slot_add': (byte_pool_config, dict(_V2, condition='slot_add')),
    'v2_ragged_only': (byte_pool_config, dict(_V2_FIRST, **_CHUNK_ONLY)),
    'v2_prev_bytes_decoder': (byte_pool_config, dict(_V2_FIRST, encoder_context='chunk',
                                                     ngram_buckets=0)),
    'v2_prev_bytes_ngram': (byte_pool_config, dict(_V2_FIRST, encoder_context='chunk')),
    'v2_pool_attention': (byte_pool_config, dict(_V2_FIRST, pooling='attention')),
    'v2_pool_last': (byte_pool_config, dict(_V2_FIRST, pooling='last')),
}


def row_config(name: str, configs_dir: str = files.DEFAULT_DIR):
  """The tiny-preset config of row `name` with its byte-pool overrides; KeyError if unknown."""
  config_file, byte_overrides = ROWS[name]
  c = files.load(os.path.join(configs_dir, config_file), 'tiny')
  if byte_overrides:
    c.model.byte_pool.update(byte_overrides)
  return c
