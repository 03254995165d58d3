"""Tests for stlm/experiments/encoder_corpora: whole-document subsets within a byte budget,
their manifests, corpus checks, and the one tokenizer shared by every arm."""

import json

import pytest

from stlm import cli_errors
from stlm.experiments import encoder_corpora as ec

DOCS = ['First address, short.', 'Second address: a longer one, über alles.', 'Third.']


@pytest.fixture
def root(tmp_path):
  folder = tmp_path / ec.CORPORA['state_union'][0]
  folder.mkdir(parents=True)
  (folder / 'a.txt').write_text('\n\n'.join(DOCS[:2]) + '\n', encoding='utf-8')
  (folder / 'b.txt').write_text(DOCS[2] + '\n', encoding='utf-8')
  return tmp_path


def _size(docs):
  return sum(len(d.encode('utf-8')) for d in docs)


def test_subset_is_the_longest_prefix_of_whole_documents(root):
  exact = _size(DOCS[:2])
  assert ec.subset_documents('state_union', str(root), exact) == DOCS[:2]
  assert ec.subset_documents('state_union', str(root), exact + 1) == DOCS[:2]   # no cut doc
  assert ec.subset_documents('state_union', str(root), exact - 1) == DOCS[:1]


def test_subset_never_silently_smaller_than_asked(root):
  with pytest.raises(cli_errors.FlagError, match=f'holds only {_size(DOCS)} bytes'):
    ec.subset_documents('state_union', str(root), 10_000)
  with pytest.raises(cli_errors.FlagError, match='first document alone'):
    ec.subset_documents('state_union', str(root), 5)


def test_write_subset_writes_and_then_reuses(root, tmp_path):
  out = tmp_path / 'sub'
  m = ec.write_subset('state_union', str(root), _size(DOCS[:2]), out)
  assert (m['documents'], m['bytes'], m['split_by']) == (2, _size(DOCS[:2]), 'blank_line')
  assert ec.subset_texts(out) == DOCS[:2]
  assert json.loads((out / 'manifest.json').read_text()) == m
  (out / 'train.jsonl').write_text(json.dumps({'text': 'kept'}) + '\n')
  assert ec.write_subset('state_union', str(root), 1, out) == m      # cached: not rewritten
  assert ec.subset_texts(out) == ['kept']


def test_check_corpora_names_the_flag_and_the_path(root):
  ec.check_corpora(['state_union'], str(root))
  with pytest.raises(cli_errors.FlagError, match="--corpora: unknown corpus 'nosuch'"):
    ec.check_corpora(['nosuch'], str(root))
  with pytest.raises(cli_errors.FlagError, match="corpus 'lambada' needs .*lambada"):
    ec.check_corpora(['state_union', 'lambada'], str(root))


@pytest.mark.slow
def test_one_tokenizer_is_trained_once_for_every_arm(root, tmp_path):
  out = tmp_path / 'sub'
  ec.write_subset('state_union', str(root), _size(DOCS[:2]), out)
  model = tmp_path / 'tok' / 'sp.model'
  path = ec.fixed_tokenizer([out], 300, model)
  first = model.read_bytes()
  assert path == str(model) and ec.fixed_tokenizer([out, out], 320, model) == str(model)
  assert model.read_bytes() == first
