"""Configs written by older code: what a key the code added later meant before it existed.

`upgrade` completes such a config (an export's or a checkpoint's) before anything builds
from it; the resume check (stlm/train/checkpoint.py) compares a key the checkpoint lacks as
its `LEGACY_VALUES` entry.
"""

import ml_collections

from stlm.config import schema

# Keys added after runs with checkpoints already existed whose schema default is NOT what
# the code did before the key existed, with the value that is. Every other key added later
# takes its schema default, which computes what older code computed (`model.ce_chunk` only
# changes how the same loss is computed).
LEGACY_VALUES = {
    'model.byte_pool.slot_embedding': False,
    'model.byte_pool.condition': 'add',
    'model.byte_pool.condition_at': 'input',
    'model.byte_pool.cross_chunks': 4,   # read only with condition 'cross_attention'
}


def _fill(node: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str):
  for key, default in reference.items():
    path = f'{prefix}{key}'
    if isinstance(default, ml_collections.ConfigDict):
      if key not in node:
        node[key] = ml_collections.ConfigDict()
      _fill(node[key], default, f'{path}.')
    elif key not in node:
      node[key] = LEGACY_VALUES.get(path, default)


def upgrade(config) -> ml_collections.ConfigDict:
  """A copy of `config` (a whole experiment config, as a ConfigDict or dict, written by any
  version of this code) with every key of today's schema: a missing key gets its
  LEGACY_VALUES entry, else the schema default. Keys the schema does not know are kept."""
  plain = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  out = ml_collections.ConfigDict(plain)
  _fill(out, schema.base_config(), '')
  return out
