"""Pause tokens (Goyal et al. 2023): learned "think" inputs that predict nothing.

Why: a transformer's compute per predicted token is fixed by its depth; a pause position
adds a column of computation (its own attention and FFN at every layer) before the next
prediction is due, which a small model may use. Here one pause follows every 8th token
(chunk for byte_pool) in training and scoring, and 2 more pauses precede each scored
continuation. A pause is one learned vector (`pause_embedding`); its positions are excluded
from the loss, from `units` and from the byte count, so bits per byte is on the same footing
as a run without pauses (the real targets are the same; they are predicted one pause later).
The context holds fewer real tokens (about 8/9 of max_len) for the same window.

Presets: tiny (the default), 10m, 50m, 100m: --config=configs/pause_tokens.py:50m
Byte-pool model: add --config.model.kind=byte_pool.
"""

from stlm import config as config_lib


def get_config(arg: str = 'tiny'):
  c = config_lib.apply_preset(config_lib.base_config(), arg or 'tiny')
  c.name = 'pause_tokens'
  c.model.pause_every = 8
  c.model.pause_count = 1
  c.model.pause_before_continuation = 2
  return c
