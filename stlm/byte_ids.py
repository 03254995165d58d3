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
