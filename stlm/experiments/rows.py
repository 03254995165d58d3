"""The rows of the byte-pool comparisons: name -> Row (config file and overrides).

Shared by the comparison command (stlm/experiments/equal_core.py) and the speed benchmark
(benchmarks/byte_pool_speed.py), so a name means the same model in both; `shared_core_config`
builds a row's config around the comparison's shared core for both.
"""

import dataclasses
import os

from stlm.config import files

baseline_config, byte_pool_config = 'baseline.py', 'byte_pool.py'


@dataclasses.dataclass(frozen=True)
class Row:
  """One comparison row.

  config: the config file (in the configs folder) whose tiny preset the row starts from.
  byte_pool: model.byte_pool overrides.
  tokenizer: tokenizer.kind override ('bytes': a plain byte-level model over the same core).
  context_in_bytes: the row's context is the shared context (in GPT-2 tokens) times the
    corpus's bytes per token, so one row covers the same text as a BPE row.
  local_only: no core: a byte-level transformer the size of the byte-pool decoder (its
    layers, width, heads, FFN) with its window as context; the floor a core must beat.
  """
  config: str
  byte_pool: dict | None = None
  tokenizer: str = ''
  context_in_bytes: bool = False
  local_only: bool = False

  @property
  def has_core(self) -> bool:
    return not self.local_only


def _byte_pool(**overrides) -> Row:
  return Row(byte_pool_config, overrides)


# v2 rows add one ingredient at a time. Every row pins its decoder conditioning, so that a row
# keeps measuring the same model when configs/byte_pool.py's defaults move on: 'v2' has slot
# embeddings and one core vector added after the decoder's first attention, 'v2_cross'
# cross-attends to the core. The ablation rows of the first v2 design pin its conditioning (no
# slot embeddings, core output added at the decoder input).
_V2 = dict(version='v2', condition='add')
_V2_FIRST = dict(_V2, slot_embedding=False, condition_at='input')
_CHUNK_ONLY = dict(encoder_context='chunk', decoder_context='chunk', ngram_buckets=0)
_CROSS = dict(version='v2', condition='cross_attention', condition_at='after_attention',
              decoder_context='window', pooling='mean', decoder_layers=1, ngram_hashes=1)
# The decoder's only view across chunks is the core (MEGABYTE's chunk-only local model), which
# cross-attends before every decoder block (BLT); two decoder layers.
_CORE = dict(_CROSS, decoder_context='chunk', condition_at='every_layer', decoder_layers=2)
ROWS = {
    # The references: BPE over the same core; the same core over bytes (context covering the
    # same text); the byte-pool decoder alone, with no core.
    'baseline': Row(baseline_config),
    'bytes': Row(baseline_config, tokenizer='bytes', context_in_bytes=True),
    'local_only': Row(baseline_config, tokenizer='bytes', local_only=True,
                      byte_pool=dict(_CROSS)),
    'paper': _byte_pool(version='paper'),
    'v2': _byte_pool(**_V2),
    'v2_cross': _byte_pool(**_CROSS),
    # More local capacity for spelling out the next chunk from the core: a second decoder
    # layer; local models 96 wide (1 decoder layer: 'w96'; 2: 'wide', just over a 90%
    # parameter saving against embed + head at a 128-wide core).
    'v2_cross_dec2': _byte_pool(**dict(_CROSS, decoder_layers=2)),
    'v2_cross_w96': _byte_pool(**dict(_CROSS, byte_dim=96, encoder_ffn_dim=384,
                                      decoder_ffn_dim=384)),
    'v2_cross_wide': _byte_pool(**dict(_CROSS, byte_dim=96, decoder_layers=2,
                                       encoder_ffn_dim=384, decoder_ffn_dim=384)),
    # The core carries the context: chunk-only decoder, core in every decoder block; then a
    # position-aware chunk vector (slot concat), BLT-style n-gram tables (3 hash functions).
    'core_chunk': _byte_pool(**_CORE),
    'core_chunk_slots': _byte_pool(**dict(_CORE, pooling='slots')),
    'core_chunk_slots_hash3': _byte_pool(**dict(_CORE, pooling='slots', ngram_hashes=3)),
    # ... with local models 96 wide (as v2_cross_wide), still within a 90% saving at 128.
    'core_chunk_wide': _byte_pool(**dict(_CORE, byte_dim=96, encoder_ffn_dim=256,
                                         decoder_ffn_dim=384)),
    # The ingredients of v2's conditioning, one removed at a time.
    'v2_first': _byte_pool(**_V2_FIRST),
    'v2_no_slots': _byte_pool(**dict(_V2, slot_embedding=False)),
    'v2_cond_at_input': _byte_pool(**dict(_V2, condition_at='input')),
    'v2_slot_add': _byte_pool(**dict(_V2, condition='slot_add')),
    'v2_ragged_only': _byte_pool(**dict(_V2_FIRST, **_CHUNK_ONLY)),
    'v2_prev_bytes_decoder': _byte_pool(**dict(_V2_FIRST, encoder_context='chunk',
                                               ngram_buckets=0)),
    'v2_prev_bytes_ngram': _byte_pool(**dict(_V2_FIRST, encoder_context='chunk')),
    'v2_pool_attention': _byte_pool(**dict(_V2_FIRST, pooling='attention')),
    'v2_pool_last': _byte_pool(**dict(_V2_FIRST, pooling='last')),
}


def row_config(name: str, configs_dir: str = files.DEFAULT_DIR):
  """The tiny-preset config of row `name` with its overrides; KeyError if unknown."""
  row = ROWS[name]
  c = files.load(os.path.join(configs_dir, row.config), 'tiny')
  if row.byte_pool:
    c.model.byte_pool.update(row.byte_pool)
  if row.tokenizer:
    c.tokenizer.kind = row.tokenizer
  return c


# The byte-level sizes a preset of configs/byte_pool.py sets (its local models).
BYTE_SIZE_KEYS = ('byte_dim', 'encoder_layers', 'encoder_heads', 'encoder_ffn_dim',
                  'decoder_layers', 'decoder_heads', 'decoder_ffn_dim')


def use_byte_sizes(c, preset: str, configs_dir: str = files.DEFAULT_DIR) -> None:
  """Gives config c the local models' sizes of configs/byte_pool.py's `preset` (a byte-pool
  row measured at the byte sizes a preset trains, not the tiny ones)."""
  sizes = files.load(os.path.join(configs_dir, byte_pool_config), preset).model.byte_pool
  c.model.byte_pool.update({k: sizes[k] for k in BYTE_SIZE_KEYS})


@dataclasses.dataclass(frozen=True)
class Core:
  """The comparison's shared core: layers x hidden, heads / kv heads, FFN, context (tokens)."""
  layers: int
  hidden: int
  heads: int
  kv_heads: int
  ffn: int
  context: int

  @classmethod
  def parse(cls, core: str, heads: str, context: int, ffn: int = 0) -> 'Core':
    """From the command-line forms '4x128', '4/2'; ffn 0 = 3 x hidden."""
    layers, hidden = (int(x) for x in core.lower().split('x'))
    h, kv = (int(x) for x in heads.split('/'))
    return cls(layers, hidden, h, kv, ffn or 3 * hidden, context)


def shared_core_config(name: str, core: Core, *, bytes_per_token: float,
                       configs_dir: str = files.DEFAULT_DIR):
  """Row `name`'s config around `core` (dropout off): every row but 'local_only' runs this
  core; a context_in_bytes row gets round(context x bytes_per_token) byte positions."""
  row = ROWS[name]
  c = row_config(name, configs_dir)
  c.model.update(num_layers=core.layers, hidden_dim=core.hidden, num_heads=core.heads,
                 num_kv_heads=core.kv_heads, ffn_dim=core.ffn, max_len=core.context,
                 dropout=0.0)
  if row.context_in_bytes:
    c.model.max_len = int(round(core.context * bytes_per_token))
  if row.local_only:
    b = c.model.byte_pool
    c.model.update(num_layers=b.decoder_layers, hidden_dim=b.byte_dim, num_heads=b.decoder_heads,
                   num_kv_heads=b.decoder_heads, ffn_dim=b.decoder_ffn_dim,
                   max_len=b.local_window)
  return c
