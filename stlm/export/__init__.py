"""Exported checkpoints: params + config (+ tokenizer model), loadable with no training code.

Layout of <workdir>/export/: `config.json`, `params/` (Orbax), `params_files.json` (the size
of every file under params/, written once they are complete), and `tokenizer.model` when the
run used a sentencepiece tokenizer, so the directory is self-contained.

A directory written by `python -m stlm.compress` also holds `compression.json`: how each
compressed array is stored (stlm/export/codec.py). `load_export` decodes them, so a
compressed export loads, dequantised, wherever an export does.

`check_export` tells, without reading the params, whether a directory is a loadable export,
and names what is wrong (a training workdir or checkpoint directory given instead, a config
that is not JSON, a params file missing, truncated or of another model) as `BadExportError`,
so every command refuses a bad --checkpoint before any work and in one line.
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

from stlm import cli_errors
from stlm.config import legacy
from stlm import tokenizers
from stlm.models import factory
from stlm.models import kinds

CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'
SP_MODEL_FILE = 'tokenizer.model'
FILES_MANIFEST = 'params_files.json'
# Orbax files every params directory has; the rest are data files listed in FILES_MANIFEST.
_REQUIRED_PARAMS_FILES = ('_METADATA', 'manifest.ocdbt')


class BadExportError(cli_errors.BadInput, ValueError):
  """A directory that is not a loadable stlm export; the message names it and the file."""


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
  write_params(directory, params)
  if jax.process_index() == 0:
    with open(os.path.join(directory, CONFIG_FILE), 'w', encoding='utf-8') as f:
      f.write(config.to_json(indent=2))


def write_params(directory: str, params) -> None:
  """params/ (Orbax) and params_files.json of an export in `directory` (replaced if there).
  `stlm.compress` writes its stored form of the params through here too."""
  params_dir = os.path.join(directory, PARAMS_DIR)
  if os.path.exists(params_dir):
    shutil.rmtree(params_dir)
  # Gathered to host so an export made on any mesh loads on any machine.
  host_params = jax.tree.map(lambda x: jax.device_get(x), params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(params_dir, host_params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    # Sizes of the finished params files: a missing or cut-short file is then named before
    # Orbax reads it (Orbax's own error for a missing data file comes with thread noise).
    with open(os.path.join(directory, FILES_MANIFEST), 'w', encoding='utf-8') as f:
      json.dump(_params_files(params_dir), f, indent=0, sort_keys=True)


def _params_files(params_dir: str) -> dict[str, int]:
  out = {}
  for root, _, names in os.walk(params_dir):
    for name in names:
      full = os.path.join(root, name)
      out[os.path.relpath(full, params_dir)] = os.path.getsize(full)
  return out


def _where(directory: str, flag: str | None) -> str:
  """How messages name the directory: as given to `flag` ('--checkpoint', or a prefix such as
  '--checkpoint=scratch:' that already ends the flag), else by itself."""
  if not flag:
    return directory
  return f'{flag}{directory}' if flag.endswith((':', '=')) else f'{flag}={directory}'


def _not_an_export_hint(directory: str, flag: str | None) -> str:
  if is_export(os.path.join(directory, 'export')):
    inner = os.path.join(directory, 'export')
    return f'it is a training workdir; pass {_where(inner, flag)}' if flag else (
        f'it is a training workdir; its export is {inner}')
  if any(n.isdigit() for n in os.listdir(directory)) or os.path.isdir(
      os.path.join(directory, 'checkpoints')):
    return ('it looks like a training checkpoint directory (Orbax steps with optimizer '
            'state); commands read the export that training writes to <workdir>/export')
  return (f'{CONFIG_FILE} is missing (an export holds {CONFIG_FILE} and {PARAMS_DIR}/, '
          'written to <workdir>/export by a finished training run)')


def check_export(directory: str, flag: str | None = None) -> ml_collections.ConfigDict:
  """The export's config, after checking that `directory` is a whole export (its params
  files present with their recorded sizes); BadExportError names what is wrong. `flag` (e.g.
  '--checkpoint') is how the messages name the directory. Reads no params."""
  where = _where(directory, flag)
  if not os.path.exists(directory):
    raise BadExportError(f'{where} does not exist (expected <workdir>/export of a training '
                         'run)')
  if not os.path.isdir(directory):
    raise BadExportError(f'{where} is a file, not an export directory')
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise BadExportError(f'{where} is not an stlm export: {_not_an_export_hint(directory, flag)}')
  config = load_config(directory, flag)
  if config.model.get('kind') not in kinds.kind_names():
    raise BadExportError(f'{where} holds a model of kind {config.model.get("kind")!r}; this '
                         f'checkout knows {", ".join(kinds.kind_names())}')
  if config.tokenizer.kind == 'sentencepiece' and not os.path.isfile(
      config.tokenizer.sp_model_path):
    raise BadExportError(f'{where} is damaged: {config.tokenizer.sp_model_path} (its '
                         'sentencepiece model) is missing')
  params_dir = os.path.join(directory, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise BadExportError(f'{where} is damaged: {params_dir} is missing')
  for name in _REQUIRED_PARAMS_FILES:
    full = os.path.join(params_dir, name)
    if not os.path.isfile(full) or os.path.getsize(full) == 0:
      raise BadExportError(f'{where} is damaged: {full} is '
                           f'{"empty" if os.path.isfile(full) else "missing"}')
  try:
    with open(os.path.join(directory, FILES_MANIFEST), encoding='utf-8') as f:
      expected = json.load(f)
  except (OSError, ValueError):
    expected = {}   # an export written before the manifest existed: Orbax checks the rest
  for rel, size in sorted(expected.items()):
    full = os.path.join(params_dir, rel)
    if not os.path.isfile(full):
      raise BadExportError(f'{where} is damaged: {full} is missing')
    if os.path.getsize(full) != size:
      raise BadExportError(f'{where} is damaged: {full} has {os.path.getsize(full)} bytes, '
                           f'{size} were written')
  compression_manifest(directory, where)
  return config


def compression_manifest(directory: str, where: str | None = None) -> dict | None:
  """compression.json of an export written by `python -m stlm.compress` (None for any other
  export); BadExportError if it cannot be read."""
  from stlm.export import codec  # pylint: disable=g-import-not-at-top
  try:
    return codec.read_manifest(directory)
  except codec.ManifestError as e:
    raise BadExportError(f'{where or directory} is damaged: {e}') from None


def _read_config(directory: str, where: str) -> ml_collections.ConfigDict:
  path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise BadExportError(f'{where} is damaged: {path} is not valid JSON ({e})') from None
  if not isinstance(raw, dict) or not isinstance(raw.get('model'), dict) or not isinstance(
      raw.get('tokenizer'), dict):
    raise BadExportError(f'{where} is damaged: {path} has no model and tokenizer sections')
  return legacy.upgrade(raw)


def load_config(directory: str, flag: str | None = None) -> ml_collections.ConfigDict:
  """config.json of an export (BadExportError if there is none or it does not parse)."""
  where = _where(directory, flag)
  if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
    if not os.path.isdir(directory):
      raise BadExportError(f'{where} does not exist (expected <workdir>/export of a training '
                           'run)')
    raise BadExportError(f'{where} is not an stlm export: {_not_an_export_hint(directory, flag)}')
  config = _read_config(directory, where)
  if config.tokenizer.kind == 'sentencepiece' and not os.path.isabs(config.tokenizer.sp_model_path):
    config.tokenizer.sp_model_path = os.path.join(os.path.abspath(directory),
                                                  config.tokenizer.sp_model_path)
  return config


def load_export(directory: str, flag: str | None = None) -> Exported:
  """The export's model, params, config and tokenizer; BadExportError (naming `flag`, the
  directory and the file) for a directory that is not a whole export of one model."""
  config = check_export(directory, flag)
  where = _where(directory, flag)
  tokenizer = tokenizers.build_tokenizer(config.tokenizer)
  model = factory.build_model(config.model)
  abstract = jax.eval_shape(
      lambda: factory.init_params(model, config.model, jax.random.key(0)))
  params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      saved = ckptr.metadata(params_dir).item_metadata.tree
    except (OSError, ValueError) as e:
      raise BadExportError(f'{where} is damaged: {params_dir}: {first_error_line(e)}') from e
    # A compressed export (stlm.compress) stores some arrays as parts (int8 values and
    # scales, a sparse mask, two factors); they are restored as stored, then decoded here,
    # so every command that loads an export reads it in this one place.
    compression = compression_manifest(directory, where)
    if compression and compression['params']:
      from stlm.export import codec  # pylint: disable=g-import-not-at-top
      try:
        decoded = codec.decoded_abstract(saved, compression)
      except (codec.ManifestError, KeyError, TypeError) as e:
        raise BadExportError(f'{where} is damaged: {codec.MANIFEST} does not describe its '
                             f'params ({e})') from None
      _check_params_match(decoded, abstract, where)
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved)
    else:
      _check_params_match(saved, abstract, where)
      target = abstract
    try:
      params = ckptr.restore(params_dir, target)
    except (OSError, ValueError) as e:
      if not looks_like_damage(e):
        raise
      raise BadExportError(f'{where} is damaged: {params_dir}: {first_error_line(e)}') from e
  if compression and compression['params']:
    params = jax.tree.map(lambda x, a: jax.numpy.asarray(x, a.dtype),
                          codec.decode_params(params, compression), abstract)
  return Exported(model=model, params=params, config=config, tokenizer=tokenizer,
                  featurizer=factory.make_featurizer(config, tokenizer))


def _check_params_match(saved, abstract, where: str) -> None:
  """The saved arrays are those config.json's model has, with the same shapes (Orbax would
  restore the saved shapes silently and the model would fail later, far from the cause)."""
  def shapes(tree):
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  have, want = shapes(saved), shapes(abstract)
  missing = sorted(set(want) - set(have))
  if missing:
    raise BadExportError(f'{where} is damaged: its params lack {missing[0]} '
                         f'({len(missing)} arrays in all) that the model of {CONFIG_FILE} has')
  for key in sorted(want):
    if have[key] != want[key]:
      raise BadExportError(f'{where} is damaged: params {key} has shape {have[key]}, the '
                           f'model of {CONFIG_FILE} needs {want[key]}')


def first_error_line(e: BaseException) -> str:
  """The most specific line of a (chained) restore error: tensorstore's names the array."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).strip().splitlines()
  return (text[0] if text else type(e).__name__)[:300]


# Status words of tensorstore / file errors that mean "this file's content is bad".
_DAMAGE_MARKERS = ('DATA_LOSS', 'OUT_OF_RANGE', 'FAILED_PRECONDITION', 'NOT_FOUND',
                   'Error reading', 'Truncated', 'corrupt', 'checksum')


def looks_like_damage(e: BaseException) -> bool:
  """Whether a restore error (or one it was raised from) says a file is missing or bad."""
  seen = 0
  while e is not None and seen < 10:
    if isinstance(e, (OSError, json.JSONDecodeError, UnicodeDecodeError)):
      return True
    if any(m in str(e) for m in _DAMAGE_MARKERS):
      return True
    e, seen = e.__cause__ or e.__context__, seen + 1
  return False
