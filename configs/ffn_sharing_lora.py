"""Issue 9 option 1: a shared FFN plus a per-layer LoRA adapter (rank 8) on its kernels.

Changes: model.sharing = 'ffn', model.sharing_lora_rank = 8.
Why: plain sharing forces every layer to apply the same FFN. A low-rank per-layer correction
(W + B_l A_l, Hu et al. 2021; as in the relaxed recursive transformers of Bae et al. 2024)
gives each layer back a little freedom for a few percent of the shared FFN's parameters.
B starts at zero, so training starts from exactly the shared model.

Presets as configs/baseline.py; --config.model.kind=byte_pool adapts the byte-pool core.
"""

from configs import baseline


def get_config(arg: str = 'tiny'):
  c = baseline.get_config(arg)
  c.name = 'ffn_sharing_lora'
  c.model.sharing = 'ffn'
  c.model.sharing_lora_rank = 8
  return c
