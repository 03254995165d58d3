"""The pause-token id: one place, imported by data (featurizers) and models alike.

A pause position's input is PAUSE_ID: the token id itself for the baseline, the first slot
of the chunk row (the rest PAD) for the byte-pool model. Real ids are >= 0, so a pause can
never be confused with text. Imports nothing.
"""

PAUSE_ID = -1
