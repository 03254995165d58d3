"""Cross-layer weight sharing (MobiLlama, ALBERT) with optional per-layer LoRA adapters.

`model.sharing`:
  none      every layer has its own attention and FFN (the default: today's model exactly);
  ffn       one FFN shared by every layer of the core (MobiLlama), attention per layer;
  ffn_attn  attention and FFN shared by every layer (ALBERT's cross-layer sharing).
Norms stay per layer in every mode (2 x hidden_dim params a layer): they are the cheap
per-layer freedom that lets identical weights act differently at different depths.

`model.sharing_lora_rank = r > 0` gives each layer its own LoRA adapter (Hu et al. 2021) on
every kernel of the shared modules: W x + B(A x), A (in x r) random, B (r x out) zero, so at
initialisation the model equals the shared model exactly and only B has a gradient at first.

The shared modules live beside the blocks in the core's param tree (`shared_attn`,
`shared_ffn`); a shared attention keeps one KV cache per layer (`key_<i>`). Only the causal
core of each model kind is shared: the byte-pool encoder / decoder configs carry no sharing.
"""

from typing import Any

import flax.linen as nn

from stlm.models import kinds
from stlm.models import layers

MODES = ('none', 'ffn', 'ffn_attn')
_PARTS = {'none': (), 'ffn': ('ffn',), 'ffn_attn': ('attn', 'ffn')}
SHARED_NAMES = {'attn': 'shared_attn', 'ffn': 'shared_ffn'}


def mode(cfg) -> str:
  """The sharing mode (configs and exports from before this option mean 'none')."""
  value = cfg.sharing
  if value not in MODES:
    raise ValueError(f'model.sharing {value!r} unknown; choose one of {", ".join(MODES)}')
  return value


def lora_rank(cfg) -> int:
  return int(cfg.sharing_lora_rank)


def shared_parts(cfg) -> tuple[str, ...]:
  """Which block parts ('attn', 'ffn') are one module shared by every layer."""
  return _PARTS[mode(cfg)]


def kernel_shapes(cfg, part: str) -> dict[str, tuple]:
  """name -> (in_shape, in_axes, out_shape, out_axes) of every kernel of a block part."""
  E, H, K, F = cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.ffn_dim
  D = layers.head_dim_of(cfg)
  if part == 'attn':
    return {'q': ((E,), ('embed',), (H, D), ('heads', 'head_dim')),
            'k': ((E,), ('embed',), (K, D), ('kv_heads', 'head_dim')),
            'v': ((E,), ('embed',), (K, D), ('kv_heads', 'head_dim')),
            'o': ((H, D), ('heads', 'head_dim'), (E,), ('embed',))}
  names = layers.ffn_variant(cfg).in_kernels
  shapes = {n: ((E,), ('embed',), (F,), ('mlp',)) for n in names}
  shapes['down'] = ((F,), ('mlp',), (E,), ('embed',))
  return shapes


class LoRA(nn.Module):
  """One layer's adapters for the kernels of a shared part: {kernel: (A, B)}."""
  cfg: Any
  part: str

  @nn.compact
  def __call__(self):
    r = lora_rank(self.cfg)
    out = {}
    shapes = kernel_shapes(self.cfg, self.part)
    for name, (in_shape, in_axes, out_shape, out_axes) in shapes.items():
      n_in = len(in_shape)
      a = layers.make_param(self, f'{name}_a',
                            layers.fan_in_init(tuple(range(n_in)), n_in),
                            in_shape + (r,), in_axes + (None,), self.cfg)
      b = layers.make_param(self, f'{name}_b', nn.initializers.zeros, (r,) + out_shape,
                            (None,) + out_axes, self.cfg)
      out[name] = (a, b)
    return out


def shared_param_count(core_params) -> int:
  """Params of the shared modules in a core's (unboxed) param tree."""
  return sum(kinds.count_params(core_params[n]) for n in SHARED_NAMES.values()
             if n in core_params)


def lora_param_count(core_params) -> int:
  return sum(kinds.count_params(v) for block in core_params.values() if isinstance(block, dict)
             for k, v in block.items() if k.endswith('_lora'))


def applied_params(core_params, cfg) -> int:
  """Params the core applies per position: shared modules count once per layer."""
  return kinds.count_params(core_params) + (cfg.num_layers - 1) * shared_param_count(core_params)


def report(core_params, cfg) -> str | None:
  """The start-up line: the core against the same core without sharing (None when off)."""
  if mode(cfg) == 'none':
    return None
  core_params = nn.unbox(core_params)
  core = kinds.count_params(core_params)
  lora = lora_param_count(core_params)
  unshared = applied_params(core_params, cfg) - lora
  saved = unshared - core
  parts = ' and '.join(shared_parts(cfg))
  return (f'sharing {mode(cfg)}: one {parts} for all {cfg.num_layers} layers'
          + (f' + per-layer LoRA rank {lora_rank(cfg)} ({lora:,} params)' if lora else '')
          + f'; core {core:,} params vs {unshared:,} unshared: {saved:,} fewer '
          f'({100 * saved / max(unshared, 1):.1f}%)')
