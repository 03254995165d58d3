"""Parameter accounting of both byte-pool versions: by role, and against a BPE baseline."""

from typing import Any

import flax.linen as nn
import jax

from stlm.models import kinds
from stlm.models import weight_sharing as sharing

# The param subtrees of the byte encoder (chunk bytes -> core input) and the byte decoder
# (core output -> next chunk's bytes), in both versions.
ENCODER, DECODER = 'byte_encoder', 'byte_decoder'


def param_report(params, model_cfg) -> dict[str, int]:
  """Byte encoder + decoder params next to the baseline's embedding + head on the same core.

  The baseline's counterpart is vocab_size x hidden_dim (x2 when untied): the only params
  the baseline has beyond the shared core.
  """
  params = nn.unbox(params)
  count = lambda t: sum(x.size for x in jax.tree.leaves(t))
  enc, dec, core = (count(params[ENCODER]), count(params[DECODER]),
                    count(params['core']))
  baseline = model_cfg.vocab_size * model_cfg.hidden_dim * (1 if model_cfg.tie_embeddings else 2)
  return dict(byte_encoder=enc, byte_decoder=dec, byte_total=enc + dec, core=core,
              total=enc + dec + core, baseline_embed_head=baseline,
              baseline_total=baseline + core)


def format_param_report(report: dict[str, int]) -> str:
  """One start-up line, e.g. for the trainer's log."""
  saved = 1.0 - report['byte_total'] / max(report['baseline_embed_head'], 1)
  return (f"byte_pool params: encoder {report['byte_encoder']:,} + decoder "
          f"{report['byte_decoder']:,} = {report['byte_total']:,} vs baseline embedding+head "
          f"{report['baseline_embed_head']:,} ({100 * saved:.1f}% fewer); core "
          f"{report['core']:,}; total {report['total']:,} (baseline with this core "
          f"{report['baseline_total']:,})")


def param_breakdown(params, model_cfg) -> dict[str, Any]:
  """embedding = the byte encoder, head = the byte decoder, core = the causal transformer.

  With weight sharing, core_applied = the core's params counted once per layer they run in.
  """
  params = nn.unbox(params)
  total = kinds.count_params(params)
  embedding = sum(kinds.count_params(v) for k, v in params.items() if 'encoder' in k)
  head = sum(kinds.count_params(v) for k, v in params.items() if 'decoder' in k)
  out = dict(embedding=embedding, head=head, core=total - embedding - head, total=total,
             tied=False)
  if sharing.mode(model_cfg) != 'none':
    out['core_applied'] = sharing.applied_params(params['core'], model_cfg)
  return out
