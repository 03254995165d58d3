"""Exported checkpoints: params + config (+ tokenizer model), loadable with no training code.

Layout of <workdir>/export/: `config.json`, `params/` (Orbax), and `tokenizer.model` when the
run used a sentencepiece tokenizer, so the directory is self-contained.
"""

import dataclasses
import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

from stlm.config import legacy
from stlm import tokenizers
from stlm.models import factory

CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'
SP_MODEL_FILE = 'tokenizer.model'


@dataclasses.dataclass
class Exported:
  model: nn.Module
  params: Any
  config: ml_collections.ConfigDict
  tokenizer: Any
  featurizer: Any


def is_export(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, CONFIG_FILE)) and os.path.isdir(
      os.path.join(directory, PARAMS_DIR))


def save_export(directory: str, params, config) -> None:
  """Writes params and config; only replaces an export of the same config (see train loop).

  The export is written whole under <directory>.writing, then renamed into place (an older
  export first renamed aside, then removed), so a reader sees the old export, the new one, or
  for the instant between two renames none, never half of one; a write that fails leaves the
  old export as it was.
  """
  directory = os.path.abspath(directory)
  staging, old = directory + '.writing', directory + '.old'
  if jax.process_index() == 0 and os.path.exists(staging):
    shutil.rmtree(staging)   # left by an export that was killed
  _sync('stlm: export staging cleared')
  _write_export(staging, params, config)
  if jax.process_index() == 0:
    if os.path.exists(old):
      shutil.rmtree(old)
    if os.path.exists(directory):
      os.rename(directory, old)
    os.rename(staging, directory)
    if os.path.exists(old):
      shutil.rmtree(old)
  _sync('stlm: export in place')


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _write_export(directory: str, params, config) -> None:
  config = ml_collections.ConfigDict(config.to_dict())
  if config.tokenizer.kind == 'sentencepiece':
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, SP_MODEL_FILE)
    if os.path.abspath(config.tokenizer.sp_model_path) != target:
      shutil.copyfile(config.tokenizer.sp_model_path, target)
    config.tokenizer.sp_model_path = SP_MODEL_FILE  # relative: the export can be moved
  params_dir = os.path.join(directory, PARAMS_DIR)
  if os.path.exists(params_dir):
    shutil.rmtree(params_dir)
  # Gathered to host so an export made on any mesh loads on any machine.
  host_params = jax.tree.map(lambda x: jax.device_get(x), params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(params_dir, host_params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(directory, CONFIG_FILE), 'w', encoding='utf-8') as f:
      f.write(config.to_json(indent=2))


def load_config(directory: str) -> ml_collections.ConfigDict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory} is not an stlm export: {CONFIG_FILE} is missing '
                            '(expected <workdir>/export from a finished training run)')
  with open(path, encoding='utf-8') as f:
    config = legacy.upgrade(json.load(f))
  if config.tokenizer.kind == 'sentencepiece' and not os.path.isabs(config.tokenizer.sp_model_path):
    config.tokenizer.sp_model_path = os.path.join(os.path.abspath(directory),
                                                  config.tokenizer.sp_model_path)
  return config


def load_export(directory: str) -> Exported:
  config = load_config(directory)
  tokenizer = tokenizers.build_tokenizer(config.tokenizer)
  model = factory.build_model(config.model)
  abstract = jax.eval_shape(
      lambda: factory.init_params(model, config.model, jax.random.key(0)))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(os.path.abspath(directory), PARAMS_DIR), abstract)
  return Exported(model=model, params=params, config=config, tokenizer=tokenizer,
                  featurizer=factory.make_featurizer(config, tokenizer))

