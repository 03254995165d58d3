"""Mixture of depths (Raposo et al. 2024): every other block processes 12.5% of the tokens.

Why: tokens differ in how much computation they need. A router scores each token before a
routed block (block_1, block_3, ...); in training only the top-k of each sequence (k = 12.5%
of its length, the paper's best capacity) go through the block, the rest skip it on the
residual stream, and the block's output is scaled by the router's sigmoid so the router
learns from the LM loss. Top-k over a sequence peeks at later tokens, so generation and
scoring decide per token with the paper's small auxiliary predictor (trained on a
stop-gradient copy of the block input to predict top-k membership, binary cross-entropy
added to the objective): inference is causal. Metrics report `mod_frac_block<i>`, the
fraction of tokens block i processed (train: the capacity; validation: the predictor's).
This implementation still computes the routed blocks densely at inference (it masks), so
the saving is in training FLOPs of the routed blocks, not yet in wall-clock at inference.

Presets: tiny (the default), 10m, 50m, 100m: --config=configs/mixture_of_depths.py:50m
Byte-pool model (routing in the chunk-level core): add --config.model.kind=byte_pool.
"""

from stlm import config as config_lib


def get_config(arg: str = 'tiny'):
  c = config_lib.apply_preset(config_lib.base_config(), arg or 'tiny')
  c.name = 'mixture_of_depths'
  c.model.mod_capacity = 0.125
  c.model.mod_every = 2
  return c
