"""Issue 9 option 1: one feed-forward network shared by every layer (MobiLlama, Thawakar 2024).

Changes: model.sharing = 'ffn'. Attention and norms stay per layer.
Why: the FFN holds about two thirds of a block's parameters (3 x hidden x ffn_dim for
SwiGLU against ~2.5 x hidden^2 for GQA attention). MobiLlama's observation is that the FFNs
of a small model's layers learn largely redundant transforms, so one shared FFN keeps the
depth of computation (every layer still runs an FFN, same FLOPs per token) at a fraction of
the parameters, and the parameter budget saved can go to width or depth instead. The
start-up log prints the exact saving; MFU still counts the FFN once per layer.

Presets as configs/baseline.py (tiny, 10m, 50m, 100m); --config.model.kind=byte_pool shares
the byte-pool model's core the same way.
"""

from configs import baseline


def get_config(arg: str = 'tiny'):
  c = baseline.get_config(arg)
  c.name = 'ffn_sharing'
  c.model.sharing = 'ffn'
  return c
