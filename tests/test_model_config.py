"""The typed model config (stlm/models/model_config.py) and the legacy upgrade of old configs."""

import dataclasses
import json

import pytest

from stlm import config as config_lib
from stlm.config import legacy
from stlm.models import factory
from stlm.models import kinds
from stlm.models import model_config


def tiny(kind='baseline'):
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.kind = kind
  return c


def test_every_schema_key_is_a_field_and_back():
  m = tiny().model
  typed = model_config.of(m)
  flat = lambda d, p='': {f'{p}{k}': v for k0, v0 in d.items()
                          for k, v in (flat(v0, f'{k0}.').items() if isinstance(v0, dict)
                                       else [(k0, v0)])}
  assert flat(dataclasses.asdict(typed)) == flat(m.to_dict())
  assert model_config.of(typed) is typed
  with pytest.raises(dataclasses.FrozenInstanceError):
    typed.num_layers = 3


def test_the_registry_hands_kinds_the_typed_config():
  for kind in ('baseline', 'byte_pool', 'encoder'):
    model = factory.build_model(tiny(kind).model)
    assert isinstance(model.cfg, model_config.ModelConfig)


def test_a_missing_key_names_itself():
  m = tiny().model.to_dict()
  del m['byte_pool']['cross_chunks']
  with pytest.raises(config_lib.ConfigError, match=r'config\.model\.byte_pool\.cross_chunks'):
    model_config.of(m)


def test_json_lists_become_tuples_so_the_config_stays_hashable():
  m = json.loads(tiny('byte_pool').model.to_json())
  assert isinstance(m['byte_pool']['ngram_sizes'], list)
  typed = model_config.of(m)
  assert typed.byte_pool.ngram_sizes == (3, 4)
  hash(typed)


def test_plain_stack_turns_every_research_option_off():
  c = tiny()
  c.model.update(sharing='ffn', sharing_lora_rank=4, layer_drop_max=0.2, early_exit_layers='1',
                 mod_capacity=0.5, pause_every=3, remat='block')
  local = model_config.of(c.model).plain_stack(num_layers=1, hidden_dim=16)
  assert (local.sharing, local.sharing_lora_rank, local.layer_drop_max, local.early_exit_layers,
          local.mod_capacity, local.pause_every, local.remat) == ('none', 0, 0.0, '', 0.0, 0,
                                                                  'none')
  assert (local.num_layers, local.hidden_dim, local.ffn_type) == (1, 16, c.model.ffn_type)


def test_upgrade_completes_an_old_config_with_legacy_values_then_schema_defaults():
  old = tiny('byte_pool').to_dict()
  for key in ('slot_embedding', 'condition', 'condition_at', 'cross_chunks'):
    del old['model']['byte_pool'][key]
  del old['model']['ce_chunk']
  del old['model']['mlm']
  new = legacy.upgrade(old)
  b = new.model.byte_pool
  assert (b.slot_embedding, b.condition, b.condition_at, b.cross_chunks) == (
      False, 'add', 'input', 4)
  for key, value in legacy.LEGACY_VALUES.items():
    section, name = key.rsplit('.', 1)
    assert new[section.split('.')[0]][section.split('.')[1]][name] == value
  assert new.model.ce_chunk == config_lib.base_config().model.ce_chunk
  assert new.model.mlm.to_dict() == config_lib.base_config().model.mlm.to_dict()
  assert 'cross_chunks' not in old['model']['byte_pool']   # the input is left as it was
  model_config.of(new.model)   # complete: builds without a missing key


def test_upgrade_keeps_every_value_a_config_has():
  c = tiny('byte_pool')
  c.model.byte_pool.condition = 'slot_add'
  c.model.hidden_dim = 48
  assert legacy.upgrade(c).to_dict() == c.to_dict()


def test_kind_sections_are_skipped_only_by_other_kinds():
  assert kinds.foreign_config_sections('baseline') == ('model.byte_pool.', 'model.mlm.')
  assert kinds.foreign_config_sections('byte_pool') == ('model.mlm.',)
  assert kinds.foreign_config_sections('encoder') == ('model.byte_pool.',)
