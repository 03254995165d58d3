"""Start-up checks: an impossible config stops the run with one message naming the key."""

import ml_collections

from kernels import attention as attention_lib
from stlm import tokenizers
from stlm.config.errors import ConfigError  # pylint: disable=unused-import (re-exported)
from stlm.config.errors import fail as _fail
from stlm.data import chat
from stlm.data import corpus
from stlm.data import sft
from stlm.data import hf_datasets
from stlm.data import phases
from stlm.data import tfds_builders
from stlm.models import depth
from stlm.models import kinds
from stlm.models import layers
from stlm.models import transformer
from stlm.models import weight_sharing as sharing
from stlm.train import optimizer

_CHOICES = {
    'model.ffn_type': layers.FFN_VARIANTS,
    'model.position': layers.POSITION_VARIANTS,
    'model.norm': layers.NORM_VARIANTS,
    'model.dtype': layers.DTYPES,
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.attention_impl': attention_lib.IMPLEMENTATIONS,
    'model.remat': transformer.REMAT_MODES,
    'train.nonfinite_policy': ('stop', 'skip'),
    'model.sharing': sharing.MODES,
    'tokenizer.kind': tokenizers.KINDS,
    'data.split_by': corpus.SPLIT_RULES,
    'data.decode_errors': ('strict', 'replace'),
    'train.optimizer': optimizer.OPTIMIZERS,
    'train.schedule': optimizer.SCHEDULES,
    'train.wsd_decay_shape': optimizer.WSD_DECAY_SHAPES,
    'train.weight_decay_params': optimizer.DECAY_PARAMS,
    'train.dropout_schedule': optimizer.DROPOUT_SCHEDULES,
    'train.wandb_mode': ('offline', 'online'),
}

_WANDB_PROJECT_FORBIDDEN = '/\\#?%:'

_POSITIVE_INTS = (
    'model.num_layers', 'model.hidden_dim', 'model.num_heads', 'model.num_kv_heads',
    'model.ffn_dim', 'model.max_len', 'model.vocab_size', 'train.batch_size', 'train.grad_accum',
    'train.steps', 'train.log_every', 'train.eval_every',
    'train.ckpt_every', 'train.keep_checkpoints', 'train.max_consecutive_skips',
)


def _get(c, key):
  node = c
  for part in key.split('.'):
    node = node[part]
  return node


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first impossible setting found."""
  if c.model.kind not in kinds.kind_names():
    _fail('model.kind', c.model.kind,
          f'unknown value; choose one of {", ".join(kinds.kind_names())}')
  for key, choices in _CHOICES.items():
    value = _get(c, key)
    if value not in choices:
      _fail(key, value, f'unknown value; choose one of {", ".join(choices)}')
  for key in _POSITIVE_INTS:
    value = _get(c, key)
    if not isinstance(value, int) or value <= 0:
      _fail(key, value, 'must be a positive integer')

  m = c.model
  if m.hidden_dim % m.num_heads:
    _fail('model.num_heads', m.num_heads, f'does not divide model.hidden_dim={m.hidden_dim}')
  if m.num_heads % m.num_kv_heads:
    _fail('model.num_kv_heads', m.num_kv_heads,
          f'does not divide model.num_heads={m.num_heads} (grouped-query attention)')
  position = layers.POSITION_VARIANTS[m.position]
  if position.rotary and (m.hidden_dim // m.num_heads) % 2:
    _fail('model.position', m.position, f'needs an even head dimension, got '
          f'{m.hidden_dim}/{m.num_heads}={m.hidden_dim // m.num_heads}')
  if position.absolute == 'learned' and m.position_table_len and m.max_len > m.position_table_len:
    _fail('model.max_len', m.max_len, f'is longer than the learned position table '
          f'(model.position_table_len={m.position_table_len})')
  if not isinstance(m.scan_layers, bool):
    _fail('model.scan_layers', m.scan_layers, 'must be True or False')
  if m.scan_layers and m.sharing != 'none':
    _fail('model.scan_layers', True, f'compiles one block for all layers; with '
          f'model.sharing={m.sharing!r} the layers share modules instead: set one of them off')
  if not isinstance(m.ce_chunk, int) or m.ce_chunk < 0:
    _fail('model.ce_chunk', m.ce_chunk, 'must be an integer >= 0 (0 = full logits)')
  if not 0.0 <= m.dropout < 1.0:
    _fail('model.dropout', m.dropout, 'must be in [0, 1)')
  try:
    depth.validate(m)
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None
  for key in ('pause_every', 'pause_before_continuation'):
    if not isinstance(m[key], int) or m[key] < 0:
      _fail(f'model.{key}', m[key], 'must be an integer >= 0 (0 = off)')
  if not isinstance(m.pause_count, int) or m.pause_count < 1:
    _fail('model.pause_count', m.pause_count, 'must be a positive integer')
  if not isinstance(m.sharing_lora_rank, int) or m.sharing_lora_rank < 0:
    _fail('model.sharing_lora_rank', m.sharing_lora_rank, 'must be an integer >= 0')
  if m.sharing_lora_rank and m.sharing == 'none':
    _fail('model.sharing_lora_rank', m.sharing_lora_rank,
          "adapts shared weights; set model.sharing to 'ffn' or 'ffn_attn' (or the rank to 0)")
  kinds.get_kind(m.kind).validate(m)

  t = c.train
  if not isinstance(t.eval_batches, int) or t.eval_batches < 0:
    _fail('train.eval_batches', t.eval_batches, 'must be >= 0 (0 = the whole validation split)')
  if t.lr <= 0:
    _fail('train.lr', t.lr, 'must be positive')
  if t.warmup_steps < 0 or t.warmup_steps > t.steps:
    _fail('train.warmup_steps', t.warmup_steps, f'must be in [0, train.steps={t.steps}]')
  if not 0.0 <= t.min_lr_ratio <= 1.0:
    _fail('train.min_lr_ratio', t.min_lr_ratio, 'must be in [0, 1]')
  if not 0.0 < t.wsd_decay_fraction <= 1.0:
    _fail('train.wsd_decay_fraction', t.wsd_decay_fraction, 'must be in (0, 1]')
  if not isinstance(t.dropout_schedule_steps, int) or t.dropout_schedule_steps < 0:
    _fail('train.dropout_schedule_steps', t.dropout_schedule_steps,
          'must be an integer >= 0 (0 = train.steps)')
  if t.optimizer == 'muon':
    if t.muon_lr <= 0:
      _fail('train.muon_lr', t.muon_lr, 'must be positive')
    if not 0.0 <= t.muon_momentum < 1.0:
      _fail('train.muon_momentum', t.muon_momentum, 'must be in [0, 1)')
    if t.muon_weight_decay < 0:
      _fail('train.muon_weight_decay', t.muon_weight_decay, 'must be >= 0')
  if t.grad_clip < 0:
    _fail('train.grad_clip', t.grad_clip, 'must be >= 0 (0 disables clipping)')
  for key in ('wandb_project', 'wandb_entity'):
    if not isinstance(t[key], str):
      _fail(f'train.{key}', t[key], "must be a string ('' = off / the default)")
  # W&B's own rule for project names, checked here so a bad one stops the run before any work.
  if len(t.wandb_project) > 128 or set(t.wandb_project) & set(_WANDB_PROJECT_FORBIDDEN):
    _fail('train.wandb_project', t.wandb_project,
          f'must be at most 128 characters, none of {_WANDB_PROJECT_FORBIDDEN}')

  d = c.data
  if not 0.0 < d.val_fraction < 1.0:
    _fail('data.val_fraction', d.val_fraction, 'must be in (0, 1)')
  if d.source == 'local' and not d.path:
    _fail('data.path', d.path, "data.source='local' needs a directory of .txt/.jsonl files")
  if d.source == 'mix' and not d.mix:
    _fail('data.mix', dict(d.mix), "data.source='mix' needs {source name: weight}")
  if not isinstance(d.mix_temperature, (int, float)) or not d.mix_temperature > 0:
    _fail('data.mix_temperature', d.mix_temperature, 'must be a positive number (1 = the weights)')
  try:
    specs = phases.parse(d.phases)
    phases.check_steps(specs, t.steps)
  except phases.PhaseSpecError as e:
    _fail('data.phases', d.phases, str(e))
  # Each source the run reads, with the data section it reads (a phase's own, for phases);
  # a bad data.sources entry is a ConfigError naming its key from here.
  for name, cfg in tfds_builders.named_sources(d).values():
    if hf_datasets.is_hf(name):
      try:
        hf_datasets.resolve(name, cfg)
      except hf_datasets.HfDataError as e:
        raise ConfigError(f'config.{e}') from None
  _validate_sft(c)
  if c.tokenizer.kind == 'sentencepiece' and c.tokenizer.sp_vocab_size < 260:
    _fail('tokenizer.sp_vocab_size', c.tokenizer.sp_vocab_size,
          'must be >= 260 (256 byte-fallback pieces plus specials)')

  if not isinstance(c.train.get('init_from', ''), str):
    _fail('train.init_from', c.train.init_from, "must be an export directory ('' = none)")

  shape = tuple(c.mesh.shape)
  if len(shape) != len(c.mesh.axes):
    _fail('mesh.shape', shape, f'needs one entry per axis {tuple(c.mesh.axes)}')
  if sum(1 for s in shape if s == -1) > 1 or any(s == 0 or s < -1 for s in shape):
    _fail('mesh.shape', shape, 'entries must be positive, with at most one -1')


def _validate_sft(c) -> None:
  """Instruction tuning: a known template over instruction data, on a kind that generates."""
  s, d = c.get('sft'), c.data
  template = s.get('template', '') if s else ''
  if template and template not in chat.TEMPLATES and not s.get('markers'):
    _fail('sft.template', template, f'unknown value; choose one of {", ".join(chat.TEMPLATES)}')
  if s and s.get('loss_on', 'response') not in sft.LOSS_ON:
    _fail('sft.loss_on', s.loss_on, f'unknown value; choose one of {", ".join(sft.LOSS_ON)}')
  if d.get('instruct_layout', 'auto') not in chat.LAYOUTS:
    _fail('data.instruct_layout', d.instruct_layout,
          f'unknown value; choose one of {", ".join(chat.LAYOUTS)}')
  if d.source == 'instruct':
    if not template:
      _fail('sft.template', template, "data.source='instruct' needs a prompt template "
            f'({", ".join(chat.TEMPLATES)})')
  if not template:
    return
  if d.source != 'instruct':
    _fail('data.source', d.source, f"sft.template={template!r} trains on instruction data: set "
          "data.source='instruct' and data.path to the file")
  if kinds.get_kind(c.model.kind).generation is None:
    _fail('sft.template', template, f'model.kind={c.model.kind!r} does not generate text')
  if c.model.pause_every or c.model.pause_before_continuation:
    _fail('sft.template', template, 'is not supported with pause tokens (model.pause_*)')
