"""Loaders for the classification releases of the "Tiny language models" study.

Layouts (../shared/data/README.md, and each folder's readme/meta file):
  AG News      CSV, no header: "class","title","description"; class 1-4 (classes.txt).
  AG News JM   CSV with header `label,content` (the jointmatch subsets). The data README says
               labels 0-3, but the shared file holds 1-4 (2,000 each; its first row, label 1,
               is a World story), i.e. the release ids: the loader reads both, as declared by
               `label_base`, and auto-detects it from the labels seen when not told.
  DBpedia      CSV, no header: label,text. keaml files: label 0-13 (= release id - 1).
               dhim files: label 1-14 RENUMBERED; `dhim_meta.txt` beside them maps each id to
               a class name, which is mapped back to the release order of classes.txt.
  FewRel       JSON {relation_id: [{tokens, h: [name, qid, [[idx...]]], t: [...]}]}.

Every loader takes a path and returns `Examples` (texts, integer labels 0..C-1 in the release
class order, class names, and the file:line of each row). A malformed row or a label outside
the class list stops with file:line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import re

from stlm import cli_errors

AGNEWS_CLASSES = ('World', 'Sports', 'Business', 'Science/Tech')  # classes.txt
# The release order of DBpedia-14 (classes.txt: id 1 = Company ... 14 = WrittenWork).
DBPEDIA_CLASSES = ('Company', 'EducationalInstitution', 'Artist', 'Athlete', 'OfficeHolder',
                   'MeanOfTransportation', 'Building', 'NaturalPlace', 'Village', 'Animal',
                   'Plant', 'Album', 'Film', 'WrittenWork')


class DataFormatError(cli_errors.BadInput, ValueError):
  """A row or file that does not follow its release layout (message names file:line)."""


@dataclasses.dataclass
class Examples:
  texts: list[str]
  labels: list[int]
  classes: tuple[str, ...]
  origins: list[str]          # 'file:line' of each example, for messages

  def __len__(self):
    return len(self.texts)

  def subset(self, indices) -> 'Examples':
    idx = list(indices)
    return Examples([self.texts[i] for i in idx], [self.labels[i] for i in idx], self.classes,
                    [self.origins[i] for i in idx])


def _read_classes_file(path: pathlib.Path) -> tuple[str, ...]:
  return tuple(line.strip() for line in path.read_text(encoding='utf-8').splitlines()
               if line.strip())


def _csv_rows(path: pathlib.Path):
  """(line number where the row starts, fields) of every CSV row (quoted newlines allowed)."""
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.reader(f, strict=True)
    line = 1
    while True:
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        raise DataFormatError(f'{path}:{reader.line_num}: malformed CSV ({e})') from None
      yield line, row
      line = reader.line_num + 1


def _label(path, line, raw: str, base: int, classes) -> int:
  try:
    value = int(raw.strip())
  except ValueError:
    raise DataFormatError(f'{path}:{line}: label {raw!r} is not an integer') from None
  if not base <= value < base + len(classes):
    raise DataFormatError(
        f'{path}:{line}: label {value} is outside the class list ({base}..'
        f'{base + len(classes) - 1}: {", ".join(classes)})')
  return value - base


def _unescape(text: str) -> str:
  # The AG News release writes newlines as a backslash followed by 'n' (readme.txt), and
  # in practice often as a bare backslash joining two lines.
  return text.replace('\\n', ' ').replace('\\', ' ').strip()


def load_agnews(path: str | os.PathLike) -> Examples:
  """The release CSV (train.csv, test.csv, train_head.csv): "class","title","description"."""
  path = pathlib.Path(path)
  texts, labels, origins = [], [], []
  for line, row in _csv_rows(path):
    if len(row) != 3:
      raise DataFormatError(f'{path}:{line}: expected 3 fields "class","title","description", '
                            f'got {len(row)}')
    labels.append(_label(path, line, row[0], 1, AGNEWS_CLASSES))
    texts.append(_unescape(row[1]) + '. ' + _unescape(row[2]))
    origins.append(f'{path}:{line}')
  return Examples(texts, labels, AGNEWS_CLASSES, origins)


def load_agnews_jointmatch(path: str | os.PathLike, label_base: int | None = None) -> Examples:
  """Header `label,content`; label_base 0 or 1 (None: 1 if no label 0 and some label 4)."""
  path = pathlib.Path(path)
  rows = list(_csv_rows(path))
  if not rows or [c.strip() for c in rows[0][1]] != ['label', 'content']:
    raise DataFormatError(f'{path}:1: expected the header "label,content"')
  body = rows[1:]
  for line, row in body:
    if len(row) != 2:
      raise DataFormatError(f'{path}:{line}: expected 2 fields label,content, got {len(row)}')
  if label_base is None:
    seen = {r[0].strip() for _, r in body}
    label_base = 1 if '0' not in seen and '4' in seen else 0
  labels = [_label(path, line, row[0], label_base, AGNEWS_CLASSES) for line, row in body]
  return Examples([_unescape(r[1]) for _, r in body], labels, AGNEWS_CLASSES,
                  [f'{path}:{line}' for line, _ in body])


def read_dhim_meta(path: str | os.PathLike) -> dict[int, str]:
  """dhim_meta.txt: lines `<id>: <ClassName>`, then a `#train: ...` statistics line."""
  path = pathlib.Path(path)
  out = {}
  for i, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    m = re.fullmatch(r'(\d+)\s*:\s*(\S.*)', line)
    if not m:
      raise DataFormatError(f'{path}:{i}: expected "<id>: <ClassName>", got {line!r}')
    if m.group(2) not in DBPEDIA_CLASSES:
      raise DataFormatError(f'{path}:{i}: class {m.group(2)!r} is not a DBpedia-14 class')
    out[int(m.group(1))] = m.group(2)
  if sorted(out.values()) != sorted(DBPEDIA_CLASSES):
    raise DataFormatError(f'{path}: does not name each of the 14 DBpedia classes once')
  return out


def load_dbpedia(path: str | os.PathLike, meta: str | os.PathLike | None = None) -> Examples:
  """DBpedia-14 `label,text` CSV.

  With `meta` (a dhim_meta.txt), labels are the renumbered dhim ids it lists; without it,
  labels are 0-13 in the release order (the keaml files).
  """
  path = pathlib.Path(path)
  ids = read_dhim_meta(meta) if meta else None
  texts, labels, origins = [], [], []
  for line, row in _csv_rows(path):
    if len(row) != 2:
      raise DataFormatError(f'{path}:{line}: expected 2 fields label,text, got {len(row)}')
    if ids is None:
      labels.append(_label(path, line, row[0], 0, DBPEDIA_CLASSES))
    else:
      try:
        name = ids[int(row[0].strip())]
      except (ValueError, KeyError):
        raise DataFormatError(f'{path}:{line}: label {row[0]!r} is not one of the ids in {meta} '
                              f'({min(ids)}..{max(ids)})') from None
      labels.append(DBPEDIA_CLASSES.index(name))
    # keaml rows sometimes join sentences with a tab: it is whitespace, not a field separator.
    texts.append(' '.join(row[1].split()))
    origins.append(f'{path}:{line}')
  return Examples(texts, labels, DBPEDIA_CLASSES, origins)


def load_dbpedia_file(path: str | os.PathLike) -> Examples:
  """A DBpedia file by its documented family: dhim_* use dhim_meta.txt beside them."""
  path = pathlib.Path(path)
  meta = path.parent / 'dhim_meta.txt'
  if path.name.startswith('dhim'):
    if not meta.is_file():
      raise DataFormatError(f'{path}: dhim files have renumbered labels; {meta} is missing')
    return load_dbpedia(path, meta)
  return load_dbpedia(path)


@dataclasses.dataclass
class RelationInstance:
  tokens: list[str]
  head: list[int]      # token indices of the head entity (first mention)
  tail: list[int]
  relation: str
  origin: str


def load_fewrel(path: str | os.PathLike) -> dict[str, list[RelationInstance]]:
  """FewRel 1.0 / 2.0 JSON: relation id -> instances, in file order."""
  path = pathlib.Path(path)
  try:
    data = json.loads(path.read_text(encoding='utf-8'))
  except json.JSONDecodeError as e:
    raise DataFormatError(f'{path}:{e.lineno}: invalid JSON ({e.msg})') from None
  if not isinstance(data, dict):
    raise DataFormatError(f'{path}:1: expected an object {{relation: [instances]}}')
  out = {}
  for rel, items in data.items():
    if not isinstance(items, list):
      raise DataFormatError(f'{path}: relation {rel!r} holds {type(items).__name__}, not a list')
    insts = []
    for i, item in enumerate(items):
      where = f'{path}:{rel}[{i}]'
      try:
        tokens = item['tokens']
        head = [int(x) for x in item['h'][2][0]]
        tail = [int(x) for x in item['t'][2][0]]
      except (KeyError, IndexError, TypeError, ValueError):
        raise DataFormatError(f'{where}: expected tokens, h and t = [name, id, [[indices]]]'
                              ) from None
      if not head or not tail or max(head + tail) >= len(tokens) or min(head + tail) < 0:
        raise DataFormatError(f'{where}: entity indices outside its {len(tokens)} tokens')
      insts.append(RelationInstance(list(tokens), head, tail, rel, where))
    out[rel] = insts
  return out


def mark_entities(inst: RelationInstance) -> str:
  """The sentence with the head in [E1] ... [/E1] and the tail in [E2] ... [/E2]."""
  words = []
  h0, h1, t0, t1 = min(inst.head), max(inst.head), min(inst.tail), max(inst.tail)
  for i, tok in enumerate(inst.tokens):
    if i == h0:
      words.append(HEAD_MARK)
    if i == t0:
      words.append(TAIL_MARK)
    words.append(tok)
    if i == h1:
      words.append('[/E1]')
    if i == t1:
      words.append('[/E2]')
  return ' '.join(words)


HEAD_MARK, TAIL_MARK = '[E1]', '[E2]'


# The documented release file names per task, in order of preference (README of the data).
# Other files of the same layout are passed as paths (--train_file / --test_file).
TRAIN_FILES = {'agnews': ('train.csv', 'train_head.csv'),
               'dbpedia': ('train.csv', 'keaml_train_14000.csv'),
               'fewrel': ('train_wiki.json', 'val_wiki.json')}
TEST_FILES = {'agnews': ('test.csv',),
              'dbpedia': ('test.csv', 'dhim_test_5000.csv', 'dhim_val_5000.csv'),
              'fewrel': ('val_wiki.json',)}
TASKS = tuple(TRAIN_FILES)


def load_task_file(task: str, path: str | os.PathLike) -> Examples:
  """A text-classification file of `task` by its documented layout."""
  path = pathlib.Path(path)
  if task == 'agnews':
    with open(path, encoding='utf-8') as f:
      first = f.readline().strip()
    return load_agnews_jointmatch(path) if first == 'label,content' else load_agnews(path)
  if task == 'dbpedia':
    return load_dbpedia_file(path)
  raise ValueError(f'--task={task!r} has no text-classification files; choose agnews or dbpedia')


def find_file(task: str, data_dir: str | os.PathLike, names) -> pathlib.Path | None:
  for name in names:
    p = pathlib.Path(data_dir) / name
    if p.is_file():
      return p
  return None
