"""The rows of the byte-pool comparisons: name -> (config module, model.byte_pool overrides).

Shared by the equal-core quality comparison (stlm/experiments/equal_core.py) and the speed
benchmark (benchmarks/byte_pool_speed.py), so a name means the same model in both.
"""

from configs import baseline as baseline_config
from configs import byte_pool as byte_pool_config

# name -> (config module, model.byte_pool overrides); v2 rows add one ingredient at a time.
# Every row pins its decoder conditioning, so that a row keeps measuring what it measured when
# configs/byte_pool.py's defaults move on: 'v2' is the second session's v2 (slot embeddings,
# one core vector added after the decoder's first attention), 'v2_cross' today's default. The
# ablation rows of the first v2 (bytepool2) pin its conditioning (no slot embeddings, core
# output added at the decoder input).
_V2 = dict(version='v2', condition='add')
_V2_FIRST = dict(_V2, slot_embedding=False, condition_at='input')
_CHUNK_ONLY = dict(encoder_context='chunk', decoder_context='chunk', ngram_buckets=0)
VARIANTS = {
    'baseline': (baseline_config, None),
    'paper': (byte_pool_config, dict(version='paper')),
    'v2': (byte_pool_config, _V2),
    'v2_cross': (byte_pool_config, dict(version='v2', condition='cross_attention')),
    # More local capacity for spelling out the next chunk from the core: a second decoder
    # layer; local models 96 wide (1 decoder layer: 'w96'; 2: 'wide', just over the issue's
    # 90% parameter budget at a 128-wide core).
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
