"""Slot classes of a byte-pool target chunk, shared by both versions' `slot_class_scores`.

A target chunk is its bytes then END_OF_CHUNK, or END-OF-TEXT alone. Its symbols fall into
three classes, so per-class sums of log p add up to the chunk's log p:
  first:        slot 0, the chunk's first byte (or end-of-text, which is a chunk alone);
  later:        a byte after the first;
  end_of_chunk: the END_OF_CHUNK that closes a chunk of bytes.
"""

import jax.numpy as jnp

from stlm.ids import END_OF_CHUNK, PAD

CLASSES = ('first', 'later', 'end_of_chunk')


def class_masks(symbols, slot, real=None):
  """Class name -> bool mask (shape of `symbols`) of the real target symbols of that class;
  `slot` is each symbol's index within its chunk; `real` (default: every non-PAD symbol)
  marks the symbols that belong to a chunk."""
  real = symbols != PAD if real is None else real & (symbols != PAD)
  first = real & (slot == 0)
  end = real & (symbols == END_OF_CHUNK) & ~first
  return dict(first=first, later=real & ~first & ~end, end_of_chunk=end)


def class_sums(logprob, masks, chunk_sum):
  """Class name -> (summed log p, symbols) per target chunk; `chunk_sum` reduces a
  per-symbol array to one value per chunk (B x T)."""
  return {name: (chunk_sum(jnp.where(m, logprob, 0.0)), chunk_sum(m.astype(jnp.float32)))
          for name, m in masks.items()}
