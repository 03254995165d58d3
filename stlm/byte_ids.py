"""The byte-id scheme of the byte-pool model: one place, imported by data and models alike.

  PAD = 0           empty slot; never predicted, masked everywhere
  END_OF_CHUNK = 1  closes a text chunk in the targets (also the decoder's start input)
  EOT = 2           end-of-text chunk: the single symbol [EOT] (no END_OF_CHUNK after it)
  byte b -> b + 3   so ids 3..258 are the 256 byte values (BYTE_VOCAB ids in all)

Imports nothing: `stlm.data.chunking` and `stlm.models.byte_pool` both read it.
"""

PAD = 0
END_OF_CHUNK = 1
EOT = 2
BYTE_OFFSET = 3
BYTE_VOCAB = 256 + BYTE_OFFSET


def chunk_width(max_bytes: int) -> int:
  """Slots per chunk row: the bytes plus one for END_OF_CHUNK."""
  return int(max_bytes) + 1


# model.byte_pool.version: 'paper' (per-chunk slot rows, stlm/models/byte_pool.py) or 'v2'
# (ragged byte stream, stlm/models/byte_pool_v2.py + stlm/data/byte_stream.py).
VERSIONS = ('paper', 'v2')


def is_stream(model_cfg) -> bool:
  """Whether a byte_pool model config uses the v2 byte-stream layout."""
  return model_cfg.byte_pool.get('version', 'paper') == 'v2'


# Byte-pool v2 (ragged byte stream, stlm/data/byte_stream.py): symbols a row holds per chunk
# position when model.byte_pool.stream_len is 0. GPT-2 chunks of English prose are ~4.4 bytes,
# of the shared Wikipedia text ~3.2 (+1 END_OF_CHUNK each), so rows fill their chunk positions.
DEFAULT_SYMBOLS_PER_CHUNK = 5


def stream_len(max_len: int, max_bytes: int, configured: int = 0) -> int:
  """Symbols per row of the v2 byte stream: configured, or 5 x max_len; >= one chunk."""
  L = int(configured) or DEFAULT_SYMBOLS_PER_CHUNK * int(max_len)
  if L < max_bytes + 1:
    raise ValueError(f'model.byte_pool.stream_len={L} cannot hold one chunk of '
                     f'max_bytes_per_chunk + 1 = {max_bytes + 1} symbols')
  return L
