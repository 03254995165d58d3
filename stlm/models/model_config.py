"""The typed model config: built once, at the model boundary, from `config.model`.

The experiment config stays an `ml_collections.ConfigDict` (command-line overrides, JSON in
checkpoints and exports); every model-kind callable in the registry receives this frozen
dataclass instead (`kinds.register_kind` converts on the way in), so model code reads fields,
never `cfg.get(key, default)`. Defaults live in one table, the schema
(`stlm.config.schema.base_config`); a config written by older code is completed first by
`stlm.config.legacy.upgrade`, so a missing key here is an error that names it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from stlm.config import errors as config_errors


@dataclasses.dataclass(frozen=True)
class BytePoolConfig:
  """`model.byte_pool`: the byte-pool kind's section (stlm/models/byte_pool/)."""
  max_bytes_per_chunk: int
  byte_dim: int
  encoder_layers: int
  encoder_heads: int
  encoder_ffn_dim: int
  pooling: str
  decoder_layers: int
  decoder_heads: int
  decoder_ffn_dim: int
  decoder: str
  version: str
  stream_len: int
  local_window: int
  encoder_context: str
  decoder_context: str
  ngram_sizes: tuple[int, ...]
  ngram_buckets: int
  ngram_hashes: int
  slot_embedding: bool
  condition: str
  cross_chunks: int
  condition_at: str

  def __getitem__(self, key: str):
    return getattr(self, key)


@dataclasses.dataclass(frozen=True)
class MlmConfig:
  """`model.mlm`: the encoder kind's masking (stlm/data/mlm.py)."""
  mask_rate: float
  mask_prob: float
  random_prob: float

  def __getitem__(self, key: str):
    return getattr(self, key)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """`config.model`: the core transformer, the research options and the kinds' sections."""
  kind: str
  num_layers: int
  hidden_dim: int
  num_heads: int
  num_kv_heads: int
  ffn_type: str
  ffn_dim: int
  position: str
  rope_theta: float
  max_len: int
  position_table_len: int
  norm: str
  norm_eps: float
  dropout: float
  tie_embeddings: bool
  use_bias: bool
  dtype: str
  param_dtype: str
  attention_impl: str
  ce_chunk: int
  remat: str
  scan_layers: bool
  vocab_size: int
  sharing: str
  sharing_lora_rank: int
  layer_drop_max: float
  layer_drop_per: str
  early_exit_layers: str
  early_exit_weights: str
  early_exit_threshold: float
  mod_capacity: float
  mod_every: int
  pause_every: int
  pause_count: int
  pause_before_continuation: int
  byte_pool: BytePoolConfig
  mlm: MlmConfig

  def __getitem__(self, key: str):
    return getattr(self, key)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def plain_stack(self, **changes) -> ModelConfig:
    """This config with every research option off (no sharing, depth options, pauses,
    remat or scan) and `changes` applied: the config of a byte-level local transformer."""
    return self.replace(**{**_OPTIONS_OFF, **changes})


# The values of the research options that leave a transformer a plain stack of blocks.
_OPTIONS_OFF = dict(
    sharing='none', sharing_lora_rank=0, layer_drop_max=0.0, early_exit_layers='',
    early_exit_weights='', early_exit_threshold=0.0, mod_capacity=0.0, pause_every=0,
    pause_before_continuation=0, remat='none', scan_layers=False)


def _section(cls, node, prefix: str):
  """Instance of dataclass `cls` from a ConfigDict / dict node; nested sections recurse."""
  hints = typing.get_type_hints(cls)
  values = {}
  for field in dataclasses.fields(cls):
    key = f'{prefix}.{field.name}'
    try:
      value = node[field.name]
    except (KeyError, AttributeError):
      raise config_errors.ConfigError(
          f'config.{key} is missing (a config written by older code is completed by '
          'stlm.config.legacy.upgrade)') from None
    hint = hints[field.name]
    if dataclasses.is_dataclass(hint):
      value = _section(hint, value, key)
    elif isinstance(value, list):   # a tuple after a JSON round trip
      value = tuple(value)
    values[field.name] = value
  return cls(**values)


def of(model_cfg: Any) -> ModelConfig:
  """The typed config of `config.model` (a ConfigDict, dict or ModelConfig)."""
  if isinstance(model_cfg, ModelConfig):
    return model_cfg
  return _section(ModelConfig, model_cfg, 'model')
