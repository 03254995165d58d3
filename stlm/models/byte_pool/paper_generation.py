"""Generation of the paper byte-pool model: chunk by chunk with a cached core.

The core runs once per new chunk on its KV cache (the prefix is never recomputed,
`core_step`), then the byte decoder (`decode_logits`) writes the next chunk's bytes one at a
time until END_OF_CHUNK. It stops at end-of-text or after max_bytes bytes.
"""

import jax
import numpy as np

from stlm.data import chunking
from stlm.models import decoding
from stlm.models import kinds


def generate_chunks(model, params, model_cfg, tokenizer, data, rng, max_bytes, sampling,
                    stats, emit=None):
  (width,) = kinds.get_kind(model_cfg.kind).unit_shape(model_cfg)
  max_chunk = width - 1  # one slot is END_OF_CHUNK's
  rows, _ = chunking.encode_chunks(chunking.chunk_bytes(data, tokenizer, max_chunk), width,
                                   end_of_chunk=False)
  eot_row = np.zeros((1, width), np.int32)
  eot_row[0, 0] = chunking.EOT
  ctx = decoding.chunk_context(model, params, model_cfg)
  sampler = decoding.chunk_sampler(model, params, width, **sampling)
  y = ctx.prefill(list(np.concatenate([eot_row, rows])))
  if model_cfg.pause_before_continuation:
    y = ctx.pause(model_cfg.pause_before_continuation)
  out = bytearray()
  for i in range(max_bytes):  # every chunk adds >= 1 byte
    ids = np.asarray(sampler(y, jax.random.fold_in(rng, i)))
    chunk, is_eot = chunking.decode_chunk_ids(ids)
    if is_eot:
      break
    out += chunk
    if len(out) >= max_bytes or (emit is not None and emit(chunk)):
      break
    row, _ = chunking.encode_chunks([chunk], width, end_of_chunk=False)
    y = ctx.feed(row[0])
  stats['layers_per_unit'] = ctx.layers_per_unit
  return out
