"""The pretraining corpora of the tiny-encoder study, cut to byte budgets, and its tokenizer.

Each corpus is a folder of the shared data read the way the trainer reads local files
(stlm.data.corpus), in file order; a subset is the longest prefix of whole documents that
fits the byte budget (UTF-8 bytes of the document texts), so no document is ever cut. The
subset is written as one JSONL file, and a manifest records what it holds.

One sentencepiece model, trained once on equal shares of every corpus of the study, tokenizes
every arm: overlap with a task is then a property of the data, not of a tokenizer that was
fitted to each subset.
"""

from __future__ import annotations

import json
import os
import pathlib

from stlm import cli_errors
from stlm import tokenizers
from stlm.data import corpus as corpus_lib

# name -> (folder under the data root, how its files split into documents). The domains run
# from encyclopedic and news-like prose to children's stories.
CORPORA = {
    'wikipedia': ('corpus/wikipedia_en', 'auto'),
    'state_union': ('corpus/nltk/state_union', 'blank_line'),
    'lambada': ('corpus/lambada', 'line'),
    'tinystories': ('corpus/tinystories/train_head_cased.txt', 'blank_line'),
}


def check_corpora(names, data_root: str, flag: str = '--corpora') -> None:
  for name in names:
    if name not in CORPORA:
      raise cli_errors.FlagError(f'{flag}: unknown corpus {name!r}; choose from '
                                 f'{", ".join(CORPORA)}')
    path = pathlib.Path(data_root) / CORPORA[name][0]
    if not path.exists():
      raise cli_errors.FlagError(f'{flag}: corpus {name!r} needs {path}, which does not exist')


def subset_documents(name: str, data_root: str, budget_bytes: int) -> list[str]:
  """The longest prefix of whole documents of `name` whose UTF-8 size fits the budget.

  Raises when the corpus holds less than the budget: a subset is never silently smaller
  than asked.
  """
  rel, split_by = CORPORA[name]
  docs, size = [], 0
  for _, text in corpus_lib.local_documents(pathlib.Path(data_root) / rel, split_by,
                                            decode_errors='replace'):
    n = len(text.encode('utf-8'))
    if size + n > budget_bytes:
      if not docs:
        raise cli_errors.FlagError(f'corpus {name!r}: its first document alone ({n:,} bytes) '
                                   f'exceeds the budget of {budget_bytes:,}')
      return docs
    docs.append(text)
    size += n
  raise cli_errors.FlagError(f'corpus {name!r} ({pathlib.Path(data_root) / rel}) holds only '
                             f'{size:,} bytes, less than the budget of {budget_bytes:,}')


def write_subset(name: str, data_root: str, budget_bytes: int, out_dir: pathlib.Path) -> dict:
  """Writes <out_dir>/train.jsonl and manifest.json (reused when present); the manifest."""
  manifest_path = out_dir / 'manifest.json'
  if manifest_path.is_file():
    return json.loads(manifest_path.read_text())
  docs = subset_documents(name, data_root, budget_bytes)
  out_dir.mkdir(parents=True, exist_ok=True)
  write_atomically(out_dir / 'train.jsonl',
                   ''.join(json.dumps({'text': d}) + '\n' for d in docs).encode('utf-8'))
  manifest = {'corpus': name, 'source': str(pathlib.Path(data_root) / CORPORA[name][0]),
              'split_by': CORPORA[name][1], 'budget_bytes': budget_bytes, 'documents': len(docs),
              'bytes': sum(len(d.encode('utf-8')) for d in docs)}
  write_atomically(manifest_path, json.dumps(manifest, indent=2).encode('utf-8'))   # last
  return manifest


def write_atomically(path: pathlib.Path, data: bytes) -> None:
  """Whole or absent: processes sharing one study folder may write the same file at once."""
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  tmp.write_bytes(data)
  os.replace(tmp, path)


def subset_texts(out_dir: pathlib.Path) -> list[str]:
  with open(out_dir / 'train.jsonl', encoding='utf-8') as f:
    return [json.loads(line)['text'] for line in f if line.strip()]


def fixed_tokenizer(subset_dirs, vocab_size: int, model_path: pathlib.Path) -> str:
  """Trains (once) one sentencepiece model on the given subsets together; its path."""
  if not model_path.is_file():
    texts = [t for d in subset_dirs for t in subset_texts(d)]
    model_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(model_path, tokenizers.train_sentencepiece(texts, vocab_size))
  return str(model_path)
