"""Corpus reading: split rules, errors that name the file, the document split, tfds builders."""

import json
import pathlib

import ml_collections
import pytest

from stlm.data import corpus
from stlm.data import tfds_builders

EOT = '<|endoftext|>'


def _write(path, text, mode='w'):
  path.parent.mkdir(parents=True, exist_ok=True)
  if mode == 'wb':
    path.write_bytes(text)
  else:
    path.write_text(text, encoding='utf-8')
  return path


def test_split_rules():
  text = 'one\ntwo\n\n  \nthree<|endoftext|>four\n\nfive'
  assert corpus.split_text(text, 'file', EOT) == [text.strip()]
  assert corpus.split_text(text, 'eot', EOT) == ['one\ntwo\n\n  \nthree', 'four\n\nfive']
  assert corpus.split_text(text, 'blank_line', EOT) == [
      'one\ntwo', f'three{EOT}four', 'five']
  assert corpus.split_text(text, 'line', EOT) == ['one', 'two', f'three{EOT}four', 'five']
  # auto: the marker wins; else blank lines; else the whole text.
  assert corpus.split_text(text, 'auto', EOT) == corpus.split_text(text, 'eot', EOT)
  assert corpus.split_text('a\n\nb', 'auto', EOT) == ['a', 'b']
  assert corpus.split_text('a\nb\n', 'auto', EOT) == ['a\nb']
  with pytest.raises(corpus.CorpusError, match='split_by'):
    corpus.split_text(text, 'sentence', EOT)


def test_local_directory_recursive_txt_and_jsonl(tmp_path):
  _write(tmp_path / 'a.txt', 'para one\n\npara two\n')
  _write(tmp_path / 'sub' / 'b.txt', f'story 1{EOT}story 2{EOT}\n')
  _write(tmp_path / 'sub' / 'deeper' / 'c.jsonl',
         '\n'.join(json.dumps({'text': t, 'other': 1}) for t in ['doc x', 'doc\n\ny']) + '\n\n')
  _write(tmp_path / 'ignored.csv', 'a,b\n')
  docs = list(corpus.local_documents(tmp_path))
  assert docs == [('a.txt#0', 'para one'), ('a.txt#1', 'para two'),
                  ('sub/b.txt#0', 'story 1'), ('sub/b.txt#1', 'story 2'),
                  ('sub/deeper/c.jsonl#0', 'doc x'), ('sub/deeper/c.jsonl#1', 'doc\n\ny')]
  by_file = [t for _, t in corpus.local_documents(tmp_path, split_by='file')]
  assert by_file[0] == 'para one\n\npara two'
  # A single file works as a path too.
  assert [t for _, t in corpus.local_documents(tmp_path / 'a.txt')] == ['para one', 'para two']


def test_jsonl_field_and_eot(tmp_path):
  f = _write(tmp_path / 'x.jsonl', json.dumps({'body': f'a{EOT}b'}) + '\n')
  assert corpus.file_documents(f, 'auto', EOT, 'body') == ['a', 'b']
  assert corpus.file_documents(f, 'file', EOT, 'body') == [f'a{EOT}b']


def test_missing_and_empty(tmp_path):
  with pytest.raises(corpus.CorpusError, match='does not exist'):
    list(corpus.local_documents(tmp_path / 'nope'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(corpus.CorpusError, match=r'holds no \.txt or \.jsonl'):
    list(corpus.local_documents(tmp_path / 'empty'))
  _write(tmp_path / 'blank' / 'x.txt', '\n \n\n')
  with pytest.raises(corpus.CorpusError, match='no non-empty documents'):
    list(corpus.local_documents(tmp_path / 'blank'))
  with pytest.raises(corpus.CorpusError, match='data.path is empty'):
    corpus.corpus_files('')


def test_non_utf8_names_path_line_and_offset(tmp_path):
  f = _write(tmp_path / 'bad.txt', b'line one\nline two \xff here\n', mode='wb')
  with pytest.raises(corpus.CorpusError) as e:
    list(corpus.local_documents(tmp_path))
  assert f'{f}:2:' in str(e.value) and 'byte offset 18' in str(e.value)
  assert isinstance(e.value, ValueError)
  assert "decode_errors='replace'" in str(e.value)
  docs = [t for _, t in corpus.local_documents(tmp_path, split_by='file', decode_errors='replace')]
  assert docs == ['line one\nline two \ufffd here']
  with pytest.raises(corpus.CorpusError, match='decode_errors'):
    corpus.file_documents(f, decode_errors='ignore')


def test_bad_jsonl_names_path_and_line(tmp_path):
  f = _write(tmp_path / 'd.jsonl', '{"text": "ok"}\n\n{"text": broken\n')
  with pytest.raises(corpus.CorpusError, match=f'{f}:3: invalid JSON'):
    corpus.file_documents(f)
  g = _write(tmp_path / 'e.jsonl', '{"text": "ok"}\n{"title": "no text"}\n')
  with pytest.raises(corpus.CorpusError, match=f"{g}:2: record has no field 'text'"):
    corpus.file_documents(g)
  h = _write(tmp_path / 'f.jsonl', '{"text": 3}\n')
  with pytest.raises(corpus.CorpusError, match=f'{h}:1: .* not a string'):
    corpus.file_documents(h)


def test_unreadable_file(tmp_path, monkeypatch):
  f = _write(tmp_path / 'secret.txt', 'x')
  real = pathlib.Path.read_bytes

  def read_bytes(self):  # chmod 0 does not stop root, so fake the OS refusing
    if self == f:
      raise PermissionError(13, 'Permission denied', str(self))
    return real(self)

  monkeypatch.setattr(pathlib.Path, 'read_bytes', read_bytes)
  with pytest.raises(corpus.CorpusError, match=f'{f}: cannot read file: Permission denied'):
    list(corpus.local_documents(tmp_path))


def test_split_is_by_document_stable_and_nonempty():
  docs = [(f'k{i}', f'document number {i}') for i in range(400)]
  split = corpus.split_documents(docs, 0.1)
  train, val = split['train'], split['validation']
  assert len(train) + len(val) == 400 and not set(train) & set(val)
  assert 20 <= len(val) <= 60
  again = corpus.split_documents(list(reversed(docs)), 0.1)
  assert set(again['validation']) == set(val)  # order does not matter, text does
  tiny = corpus.split_documents(docs[:2], 0.01)
  assert len(tiny['validation']) == 1 and len(tiny['train']) == 1
  assert len(corpus.split_documents(docs[:1], 0.05)['validation']) == 1


def test_builtin_corpus():
  docs = corpus.builtin_documents()
  assert len(docs) > 50
  assert all(text and key.startswith('pydoc/') for key, text in docs)
  assert len({k for k, _ in docs}) == len(docs)


def test_real_corpus_loads(shared_data):
  root = shared_data / 'corpus'
  shakespeare = list(corpus.local_documents(root / 'tinyshakespeare.txt'))
  assert len(shakespeare) > 5000  # one speech a document (blank-line rule)
  assert shakespeare[0][1].startswith('First Citizen:')
  stories = corpus.file_documents(root / 'tinystories_sample.txt')
  assert len(stories) >= 2 and all(EOT not in s for s in stories)
  wiki = corpus.file_documents(root / 'wikipedia_en' / 'shard_00.jsonl')
  assert len(wiki) > 100
  # Some NLTK speeches carry stray Big5 bytes: named exactly, or replaced on request.
  with pytest.raises(corpus.CorpusError, match=r'2005-Bush\.txt:\d+: not valid UTF-8'):
    list(corpus.local_documents(root / 'nltk' / 'inaugural'))
  speeches = list(corpus.local_documents(root / 'nltk' / 'inaugural', split_by='file',
                                         decode_errors='replace'))
  assert len(speeches) > 50 and any('\ufffd' in t for _, t in speeches)


def _data_cfg(tmp_path, **kw):
  d = ml_collections.ConfigDict(dict(
      source='local', path=str(tmp_path / 'corpus'), split_by='auto', eot_marker=EOT,
      jsonl_field='text', val_fraction=0.2, data_dir=str(tmp_path / 'tfds'),
      mix=ml_collections.ConfigDict()))
  d.update(kw)
  return d


def test_local_tfds_builder_round_trip(tmp_path):
  texts = [f'document {i} with ünïcode 中 {i * "x"}'.strip() for i in range(30)]
  _write(tmp_path / 'corpus' / 'c.txt', EOT.join(texts))
  cfg = _data_cfg(tmp_path)
  got = {}
  for split in ('train', 'validation'):
    src, weight = tfds_builders.document_sources(cfg, split)['local']
    assert weight == 1.0
    got[split] = [tfds_builders.record_text(src[i]) for i in range(len(src))]
  assert sorted(got['train'] + got['validation']) == sorted(texts)
  assert got['validation'] and not set(got['train']) & set(got['validation'])
  # Prepared once: a second call reuses the files.
  assert tfds_builders.prepare('local', cfg).is_prepared()


def test_builder_configs_do_not_collide(tmp_path):
  _write(tmp_path / 'corpus' / 'c.txt', 'a\n\nb')
  a = tfds_builders.make_builder('local', _data_cfg(tmp_path))
  b = tfds_builders.make_builder('local', _data_cfg(tmp_path, split_by='file'))
  assert a.builder_config.name != b.builder_config.name
  assert a.data_dir != b.data_dir
  other = tmp_path / 'other'
  _write(other / 'corpus' / 'c.txt', 'a\n\nb')
  assert tfds_builders.make_builder('local', _data_cfg(other)).builder_config.name != (
      a.builder_config.name)


def test_builtin_builder_and_mix_sources(tmp_path):
  _write(tmp_path / 'corpus' / 'c.txt', '\n\n'.join(f'p{i}' for i in range(20)))
  cfg = _data_cfg(tmp_path, source='mix')
  cfg.mix = ml_collections.ConfigDict({'builtin': 3.0, 'local': 1.0})
  sources = tfds_builders.document_sources(cfg, 'train')
  assert {k: w for k, (_, w) in sources.items()} == {'builtin': 3.0, 'local': 1.0}
  assert len(sources['builtin'][0]) > 50
  cfg.mix = ml_collections.ConfigDict({'nope': 1.0})
  with pytest.raises(ValueError, match='Unknown data source'):
    tfds_builders.document_sources(cfg, 'train')


def test_every_builder_is_registered_and_configurable(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _write(tmp_path / 'corpus' / 'c.txt', 'a\n\nb')
  cfg = _data_cfg(tmp_path, hf_name='text', hf_data_files=str(tmp_path / 'corpus' / 'c.txt'))
  names = set()
  (tmp_path / 'items.json').write_text('[{"instruction": "Say hi.", "input": "", "output": "hi"}]')
  # The sources that read a file of their own kind rather than the corpus folder.
  own = {'instruct': dict(path=str(tmp_path / 'items.json'))}
  for source in tfds_builders.BUILDERS:
    c = cfg.copy_and_resolve_references()
    c.update(own.get(source, {}))
    builder = tfds_builders.make_builder(source, c)  # no download happens here
    assert tfds.builder_cls(builder.name) is type(builder)
    assert str(builder.data_dir).startswith(str(tmp_path / 'tfds'))
    names.add(builder.name)
  assert len(names) == len(tfds_builders.BUILDERS)
