"""Converts parameter trees between the unscanned (block_0, block_1, ...) and the scanned
(model.scan_layers: one 'blocks/block' subtree with a leading layer axis) layouts.

  params = scan_convert.to_scanned(params, num_layers)     # block_i -> blocks/block [L, ...]
  params = scan_convert.to_unscanned(params)               # and back

Works on any subtree that holds the Transformer's blocks (it looks for them at every level),
so it applies to the baseline ('transformer') and to models that nest the core deeper.
Models import no checkpoint code: restore a checkpoint's params as a plain tree, convert
with these functions, and use them with the other layout (docs/performance.md).
"""

import re

import jax
import jax.numpy as jnp

from stlm.models import transformer

_BLOCK = re.compile(r'^block_(\d+)$')


def _is_unscanned(tree) -> bool:
  return isinstance(tree, dict) and any(_BLOCK.match(k) for k in tree)


def to_scanned(params, num_layers: int):
  """block_0..block_{L-1} -> {SCANNED_NAME: {'block': stacked}} wherever they occur."""
  if not isinstance(params, dict):
    return params
  if _is_unscanned(params):
    found = sorted(int(_BLOCK.match(k).group(1)) for k in params if _BLOCK.match(k))
    if found != list(range(num_layers)):
      raise ValueError(f'expected block_0..block_{num_layers - 1}, found blocks {found}')
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[params[f'block_{i}'] for i in range(num_layers)])
    rest = {k: to_scanned(v, num_layers) for k, v in params.items() if not _BLOCK.match(k)}
    return {**rest, transformer.SCANNED_NAME: {'block': stacked}}
  return {k: to_scanned(v, num_layers) for k, v in params.items()}


def to_unscanned(params):
  """{SCANNED_NAME: {'block': stacked}} -> block_0..block_{L-1} wherever it occurs."""
  if not isinstance(params, dict):
    return params
  out = {}
  for k, v in params.items():
    if k == transformer.SCANNED_NAME and isinstance(v, dict) and set(v) == {'block'}:
      num_layers = jax.tree.leaves(v['block'])[0].shape[0]
      for i in range(num_layers):
        out[f'block_{i}'] = jax.tree.map(lambda x, i=i: x[i], v['block'])
    else:
      out[k] = to_unscanned(v)
  return out
