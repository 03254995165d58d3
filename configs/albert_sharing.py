"""Issue 9 option 1: attention AND feed-forward shared by every layer (ALBERT, Lan et al. 2020).

Changes: model.sharing = 'ffn_attn'. Only the norms (2 x hidden_dim a layer) stay per layer.
Why: ALBERT showed that sharing all of a layer's weights across depth costs little quality
for a large parameter cut: the model becomes one block iterated num_layers times, a
recurrent refinement of the residual stream. For a super tiny model this is the extreme of
the paper's question "how few parameters can carry the same compute?": FLOPs per token are
unchanged (the start-up log shows params against the unshared equivalent).

Presets as configs/baseline.py; --config.model.kind=byte_pool shares the byte-pool core.
"""

from configs import baseline


def get_config(arg: str = 'tiny'):
  c = baseline.get_config(arg)
  c.name = 'albert_sharing'
  c.model.sharing = 'ffn_attn'
  return c
