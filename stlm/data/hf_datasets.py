"""Hugging Face `datasets` as a document source (`data.source='hf'` or `'hf:<preset>'`).

A source reads one text column (or several, joined by a blank line) of a dataset that
`datasets.load_dataset` opens: a Hub dataset (`data.hf_name='roneneldan/TinyStories'`) or a
packaged loader over local files (`data.hf_name='json'` / `'parquet'` / `'csv'` / `'text'` with
`data.hf_data_files`). The tfds builder `StlmHfDataset` (stlm/data/tfds_builders.py) writes
its documents once as ArrayRecord, so training reads them through the same grain pipeline,
with the same exact resume, as every other source.

`data.source='hf'` takes its dataset from the `data.hf_*` keys. `'hf:<preset>'` names one of
the paper's corpora in `PRESETS`; a preset fixes the dataset, splits and fields (the `data.hf_*`
keys other than `hf_streaming`, `hf_revision` are then not read), so presets can be mixed
(`data.mix`) like any other source names.

Held-out documents: the dataset's own validation split when `hf_val_split` names one, else
`data.val_fraction` of `hf_split` by the hash of each document's text, as for local corpora.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import re
from typing import Iterator

from stlm.data import corpus

SOURCE = 'hf'
PACKAGED_LOADERS = ('json', 'parquet', 'csv', 'text', 'arrow')
_SPLIT_ENTRY = re.compile(r'\s*(\w+)\s*=(.*)')   # 'validation=/data/val-*.parquet'


@dataclasses.dataclass(frozen=True)
class Spec:
  """One Hugging Face dataset and what of it becomes documents."""
  name: str                 # Hub id, or a packaged loader (PACKAGED_LOADERS) over data_files
  config: str = ''          # the dataset's configuration ('' = its default)
  data_files: tuple[str, ...] = ()
  split: str = 'train'
  val_split: str = ''       # '' = hold out by document hash from `split`
  fields: tuple[str, ...] = ('text',)
  revision: str = ''        # Hub revision: a branch, tag or commit ('' = the default branch)
  streaming: bool = False   # iterate without first writing the dataset to the HF cache
  key: str = 'data.hf_name'  # the config key that named it, for error messages


# The paper's corpora on the Hub; the tfds builders fetch the same releases from their URLs.
PRESETS = {
    'tinystories': Spec('roneneldan/TinyStories', split='train', val_split='validation'),
    'wikipedia_simple': Spec('wikimedia/wikipedia', config='20231101.simple',
                             fields=('title', 'text')),
    'wikipedia_en': Spec('wikimedia/wikipedia', config='20231101.en', fields=('title', 'text')),
    'openwebtext': Spec('Skylion007/openwebtext'),
}


class HfDataError(corpus.CorpusError):
  """A Hugging Face source that cannot be read; the message names the config key."""


def is_hf(source_name: str) -> bool:
  return source_name == SOURCE or source_name.startswith(SOURCE + ':')


def _csv(value: str) -> tuple[str, ...]:
  return tuple(p.strip() for p in str(value).split(',') if p.strip())


def resolve(source_name: str, data_cfg) -> Spec:
  """The Spec that `source_name` ('hf' or 'hf:<preset>') and `data_cfg` describe."""
  streaming = bool(data_cfg.get('hf_streaming', False))
  revision = str(data_cfg.get('hf_revision', ''))
  _, _, preset = source_name.partition(':')
  if preset:
    if preset not in PRESETS:
      raise HfDataError(f'data.source={source_name!r}: no Hugging Face preset {preset!r}; '
                        f'choose one of {", ".join(SOURCE + ":" + p for p in PRESETS)}')
    return dataclasses.replace(PRESETS[preset], streaming=streaming, revision=revision,
                               key='data.source')
  name = str(data_cfg.get('hf_name', '')).strip()
  if not name:
    raise HfDataError("data.hf_name is empty; data.source='hf' needs a Hub dataset id or a "
                      f'packaged loader ({", ".join(PACKAGED_LOADERS)}) with data.hf_data_files')
  files = _csv(data_cfg.get('hf_data_files', ''))
  if name in PACKAGED_LOADERS and not files:
    raise HfDataError(f'data.hf_data_files is empty; data.hf_name={name!r} reads local files')
  fields = _csv(data_cfg.get('hf_field', 'text'))
  if not fields:
    raise HfDataError('data.hf_field is empty; name the text column (or columns, comma separated)')
  split = str(data_cfg.get('hf_split', 'train')).strip()
  if not split:
    raise HfDataError('data.hf_split is empty; name the split to train on (e.g. train)')
  return Spec(name, config=str(data_cfg.get('hf_config', '')).strip(), data_files=files,
              split=split, val_split=str(data_cfg.get('hf_val_split', '')).strip(),
              fields=fields, revision=revision, streaming=streaming)


def local_files(spec: Spec) -> dict[str, list[str]]:
  """{split: the local files its data_files patterns match, sorted}. An entry is
  `split=pattern`, or a bare pattern for the train split; a pattern matching nothing is an
  error naming it."""
  out: dict[str, list[str]] = {}
  for entry in spec.data_files:
    named = _SPLIT_ENTRY.fullmatch(entry)
    split, pattern = named.groups() if named else ('train', entry)
    matched = sorted(glob.glob(os.path.expanduser(pattern.strip()), recursive=True))
    if not matched:
      raise HfDataError(f'data.hf_data_files: {pattern.strip()!r} matches no file')
    out.setdefault(split, []).extend(os.path.abspath(p) for p in matched)
  return out


def digest(spec: Spec, val_fraction: float) -> str:
  """A short hash of everything that decides the documents (not `streaming`, which only
  decides how they are read): local files enter with their sizes and times, so an edited
  file is prepared again."""
  stamp = [(split, p, os.stat(p).st_size, os.stat(p).st_mtime_ns)
           for split, paths in sorted(local_files(spec).items()) for p in paths]
  key = repr((spec.name, spec.config, stamp, spec.split, spec.val_split, spec.fields,
              spec.revision, val_fraction))
  return hashlib.sha1(key.encode()).hexdigest()[:12]


def _load(spec: Spec, split: str, cache_dir: str):
  import datasets  # pylint: disable=g-import-not-at-top  (only sources that use it need it)
  datasets.disable_progress_bars()   # tfds reports the preparation; one bar is enough
  kwargs = dict(split=split, streaming=spec.streaming, cache_dir=cache_dir)
  if spec.config:
    kwargs['name'] = spec.config
  if spec.data_files:
    kwargs['data_files'] = local_files(spec)
    if split not in kwargs['data_files']:
      raise HfDataError(f'data.hf_data_files names no files for split {split!r} (it has '
                        f'{", ".join(kwargs["data_files"])}); write {split}=<files>')
  if spec.revision:
    kwargs['revision'] = spec.revision
  try:
    return datasets.load_dataset(spec.name, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  (network, auth, format: one line each)
    first = str(e).strip().split('\n', 1)[0]
    raise HfDataError(f'{spec.key}={spec.name!r} (split {split!r}): datasets.load_dataset '
                      f'failed: {type(e).__name__}: {first}') from None


def documents(spec: Spec, split: str, cache_dir: str) -> Iterator[tuple[str, str]]:
  """(key, text) of every non-empty row of `split`, in the dataset's order; key = split/row."""
  where = f'{spec.key}={spec.name!r} split {split!r}'
  empty = 0
  for i, row in enumerate(_load(spec, split, cache_dir)):
    parts = []
    for field in spec.fields:
      if field not in row:
        raise HfDataError(f'{where} row {i} has no field {field!r} (its fields: '
                          f'{", ".join(row)}); set data.hf_field')
      value = row[field]
      if value is None:
        continue
      if not isinstance(value, str):
        raise HfDataError(f'{where} row {i}: field {field!r} is {type(value).__name__}, '
                          'not a string; set data.hf_field')
      if value.strip():
        parts.append(value.strip())
    if parts:
      yield f'{split}/{i}', '\n\n'.join(parts)
    else:
      empty += 1
  if empty:
    logging.info('%s: %d rows without text left out', where, empty)
