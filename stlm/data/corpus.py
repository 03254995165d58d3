"""Documents from local .txt/.jsonl files or the built-in offline corpus, split by document.

How a file becomes documents (`data.split_by`):
  file        the whole .txt file is one document;
  blank_line  paragraphs separated by one or more blank (whitespace-only) lines;
  eot         pieces between end-of-text markers (`data.eot_marker`);
  line        every non-blank line (e.g. LAMBADA, one passage a line);
  auto        eot if the marker occurs in the file, else blank_line if the file has a blank
              line, else file. Chosen so TinyStories dumps split into stories, prose into
              paragraphs, and a file with neither stays whole (long documents are windowed
              later, never truncated).
A .jsonl line is one record and its `data.jsonl_field` one document, except that an eot rule
(explicit, or auto with the marker present) also splits the field at the marker.
Documents are stripped of surrounding whitespace; empty ones are dropped.
Files must be UTF-8: a bad byte stops with path:line and offset, unless
`data.decode_errors='replace'` (read with `.get`, default 'strict') turns bad bytes into
U+FFFD with a warning (the shared corpus has 7 NLTK files with stray Big5 punctuation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import re
from typing import Iterator

from stlm import cli_errors

SPLIT_RULES = ('auto', 'file', 'blank_line', 'eot', 'line')
EXTENSIONS = ('.txt', '.jsonl')
DECODE_ERRORS = ('strict', 'replace')
_BLANK_LINE = re.compile(r'\n[ \t\r\f\v]*\n\s*')


class CorpusError(cli_errors.BadInput, ValueError):
  """Bad corpus input; the message names the file (and line or byte offset)."""


def _decode(path: pathlib.Path, data: bytes, errors: str) -> str:
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    where = f'{path}:{line}: not valid UTF-8 at byte offset {e.start} ({e.reason})'
  if errors == 'replace':
    logging.warning('%s; bad bytes replaced by U+FFFD (data.decode_errors=replace)', where)
    return data.decode('utf-8', errors='replace')
  raise CorpusError(f"{where}; convert the file to UTF-8 or set data.decode_errors='replace'")


def _read(path: pathlib.Path, errors: str = 'strict') -> str:
  if errors not in DECODE_ERRORS:
    raise CorpusError(f'data.decode_errors={errors!r} is not one of {", ".join(DECODE_ERRORS)}')
  try:
    data = path.read_bytes()
  except OSError as e:
    raise CorpusError(f'{path}: cannot read file: {e.strerror or e}') from None
  return _decode(path, data, errors)


def split_text(text: str, rule: str, eot_marker: str) -> list[str]:
  """Documents of one text under `rule` (see the module docstring)."""
  if rule not in SPLIT_RULES:
    raise CorpusError(f'data.split_by={rule!r} is not one of {", ".join(SPLIT_RULES)}')
  if rule == 'auto':
    if eot_marker and eot_marker in text:
      rule = 'eot'
    elif _BLANK_LINE.search(text):
      rule = 'blank_line'
    else:
      rule = 'file'
  if rule == 'eot':
    if not eot_marker:
      raise CorpusError('data.split_by=eot needs a non-empty data.eot_marker')
    parts = text.split(eot_marker)
  elif rule == 'blank_line':
    parts = _BLANK_LINE.split(text)
  elif rule == 'line':
    parts = text.split('\n')
  else:
    parts = [text]
  return [p.strip() for p in parts if p.strip()]


def file_documents(path: str | os.PathLike, split_by: str = 'auto',
                   eot_marker: str = '<|endoftext|>',
                   jsonl_field: str = 'text', decode_errors: str = 'strict') -> list[str]:
  """Documents of one .txt or .jsonl file."""
  path = pathlib.Path(path)
  text = _read(path, decode_errors)
  if path.suffix != '.jsonl':
    return split_text(text, split_by, eot_marker)
  jsonl_rule = 'eot' if split_by == 'eot' or (split_by == 'auto' and eot_marker
                                               and eot_marker in text) else 'file'
  docs = []
  for lineno, line in enumerate(text.split('\n'), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise CorpusError(f'{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})') from None
    if not isinstance(record, dict) or jsonl_field not in record:
      raise CorpusError(f'{path}:{lineno}: record has no field {jsonl_field!r} '
                        '(set data.jsonl_field)')
    value = record[jsonl_field]
    if not isinstance(value, str):
      raise CorpusError(f'{path}:{lineno}: field {jsonl_field!r} is '
                        f'{type(value).__name__}, not a string')
    docs.extend(split_text(value, jsonl_rule, eot_marker))
  return docs


def corpus_files(path: str | os.PathLike) -> list[pathlib.Path]:
  """The .txt/.jsonl files under `path` (or `path` itself), sorted for determinism."""
  root = pathlib.Path(path).expanduser()
  if not str(path):
    raise CorpusError('data.path is empty; set it to a directory of .txt/.jsonl files')
  if not root.exists():
    raise CorpusError(f'corpus path {root} does not exist')
  if root.is_file():
    files = [root]
  else:
    files = sorted(p for p in root.rglob('*') if p.suffix in EXTENSIONS and p.is_file())
  if not files:
    raise CorpusError(f'corpus path {root} holds no .txt or .jsonl files')
  return files


def local_documents(path: str | os.PathLike, split_by: str = 'auto',
                    eot_marker: str = '<|endoftext|>',
                    jsonl_field: str = 'text',
                    decode_errors: str = 'strict') -> Iterator[tuple[str, str]]:
  """(key, text) of every document under `path`; key = 'relative/path#index'."""
  root = pathlib.Path(path).expanduser()
  files = corpus_files(root)
  found = False
  for f in files:
    rel = f.name if f == root else f.relative_to(root).as_posix()
    for i, doc in enumerate(file_documents(f, split_by, eot_marker, jsonl_field, decode_errors)):
      found = True
      yield f'{rel}#{i}', doc
  if not found:
    raise CorpusError(f'corpus path {root} has no non-empty documents')


def builtin_documents() -> list[tuple[str, str]]:
  """Python's own documentation topics (`pydoc_data.topics`), one topic a document.

  It ships with every CPython, so it is a real English/code corpus available offline
  (about 80 documents, 0.47 MB in Python 3.11).
  """
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return [(f'pydoc/{k}', v.strip()) for k, v in sorted(topics.items()) if v.strip()]


def doc_hash_fraction(text: str) -> float:
  """A stable, uniform number in [0, 1) from the document text."""
  digest = hashlib.sha256(text.encode('utf-8', 'surrogatepass')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def split_documents(docs: list[tuple[str, str]], val_fraction: float
                    ) -> dict[str, list[tuple[str, str]]]:
  """{'train': ..., 'validation': ...} by a hash of each document's text.

  Hashing the text (not the position) keeps the split stable when files are added, and
  puts duplicate documents on the same side. At least one document is held out (and, if
  there are two or more, at least one is kept for training).
  """
  if not docs:
    raise CorpusError('cannot split an empty corpus')
  if not 0.0 <= val_fraction < 1.0:
    raise CorpusError(f'data.val_fraction={val_fraction} must be in [0, 1)')
  fractions = [doc_hash_fraction(text) for _, text in docs]
  is_val = [u < val_fraction for u in fractions]
  order = sorted(range(len(docs)), key=lambda i: fractions[i])
  if not any(is_val):
    is_val[order[0]] = True
  if all(is_val) and len(docs) > 1:
    is_val[order[-1]] = False
  return {'train': [d for d, v in zip(docs, is_val) if not v],
          'validation': [d for d, v in zip(docs, is_val) if v]}


def source_documents(data_cfg) -> Iterator[tuple[str, str]]:
  """(key, text) of `data.source` 'builtin' or 'local' (other sources go through tfds)."""
  if data_cfg.source == 'builtin':
    return iter(builtin_documents())
  if data_cfg.source == 'local':
    return local_documents(data_cfg.path, data_cfg.split_by, data_cfg.eot_marker,
                           data_cfg.jsonl_field, data_cfg.get('decode_errors', 'strict'))
  raise CorpusError(f'data.source={data_cfg.source!r} has no local documents')
