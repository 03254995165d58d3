"""Reserved ids shared by data (featurizers) and models: one place, importing nothing.

Byte-pool byte ids:
  PAD = 0           empty slot; never predicted, masked everywhere
  END_OF_CHUNK = 1  closes a text chunk in the targets (also the decoder's start input)
  EOT = 2           end-of-text chunk: the single symbol [EOT] (no END_OF_CHUNK after it)
  byte b -> b + 3   so ids 3..258 are the 256 byte values (BYTE_VOCAB ids in all)

Pause tokens: a pause position's input is PAUSE_ID, the token id itself for token kinds and
the first slot of the chunk row (the rest PAD) for the byte-pool model. Real ids are >= 0,
so a pause can never be confused with text.
"""

PAD = 0
END_OF_CHUNK = 1
EOT = 2
BYTE_OFFSET = 3
BYTE_VOCAB = 256 + BYTE_OFFSET

PAUSE_ID = -1
