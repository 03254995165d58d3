"""Row layouts of the byte-pool featurizers, read by data and models alike.

The paper layout puts each chunk in a row of `chunk_width` byte slots; the v2 layout is a
ragged stream of `stream_len` symbols per row (stlm/data/byte_stream.py).
"""


def chunk_width(max_bytes: int) -> int:
  """Slots per chunk row: the bytes plus one for END_OF_CHUNK."""
  return int(max_bytes) + 1


# Symbols a v2 row holds per chunk position when model.byte_pool.stream_len is 0. GPT-2
# chunks of English prose are about 3-4.5 bytes (+1 END_OF_CHUNK each), so rows fill their
# chunk positions.
DEFAULT_SYMBOLS_PER_CHUNK = 5


def stream_len(max_len: int, max_bytes: int, configured: int = 0) -> int:
  """Symbols per row of the v2 byte stream: configured, or 5 x max_len; >= one chunk."""
  L = int(configured) or DEFAULT_SYMBOLS_PER_CHUNK * int(max_len)
  if L < max_bytes + 1:
    raise ValueError(f'model.byte_pool.stream_len={L} cannot hold one chunk of '
                     f'max_bytes_per_chunk + 1 = {max_bytes + 1} symbols')
  return L
