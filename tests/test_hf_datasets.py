"""Hugging Face datasets as a source: documents, splits, presets, errors, exact resume.

Offline throughout: the datasets are real Wikipedia pages from the shared data, loaded through
`datasets`' packaged json and parquet loaders.
"""

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stlm import config as config_lib
from stlm import tokenizers
from stlm.config import validate
from stlm.data import corpus
from stlm.data import featurize
from stlm.data import hf_datasets
from stlm.data import pipeline
from stlm.data import tfds_builders
from tests.conftest import require_shared_data
from tests.main_runs import read_metrics
from tests.main_runs import run_main

PAGES = 40


@pytest.fixture(scope='module')
def pages(tmp_path_factory):
  """The first PAGES Wikipedia pages of one shard, as the jsonl records they are, one of them
  with an empty text, plus the same records as a parquet file."""
  shard = require_shared_data() / 'corpus' / 'wikipedia_en' / 'shard_00.jsonl'
  with open(shard, encoding='utf-8') as f:
    records = [json.loads(line) for line in itertools.islice(f, PAGES)]
  records[3] = dict(records[3], text='  ')
  root = tmp_path_factory.mktemp('hf')
  with open(root / 'pages.jsonl', 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  pq.write_table(pa.Table.from_pylist(records), root / 'pages.parquet')
  return root, records


def _config(root, tmp_path, **data):
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.max_len = 64
  c.train.batch_size = 4
  c.data.source = 'hf'
  c.data.hf_name = 'json'
  c.data.hf_data_files = str(root / 'pages.jsonl')
  c.data.val_fraction = 0.2
  c.data.shuffle_buffer = 8
  c.data.data_dir = str(tmp_path / 'tfds')
  for k, v in data.items():
    c.data[k] = v
  return c


def _texts(c, split):
  docs = pipeline.document_dataset(c, split)
  return [tfds_builders.record_text(docs[i]) for i in range(len(docs))]


def test_documents_are_the_field_split_by_hash_like_a_local_corpus(pages, tmp_path):
  root, records = pages
  c = _config(root, tmp_path)
  texts = [r['text'].strip() for r in records if r['text'].strip()]
  want = corpus.split_documents([(str(i), t) for i, t in enumerate(texts)], 0.2)
  # (tfds stores records in an order of its own, by key hash: compare them as sets)
  assert sorted(_texts(c, 'train')) == sorted(t for _, t in want['train'])
  assert sorted(_texts(c, 'validation')) == sorted(t for _, t in want['validation'])
  assert len(texts) == PAGES - 1   # the blank page is left out, nothing else


def test_the_same_documents_as_the_local_source_on_the_same_file(pages, tmp_path):
  root, _ = pages
  hf = _config(root, tmp_path)
  local = _config(root, tmp_path, source='local', path=str(root / 'pages.jsonl'))
  for split in ('train', 'validation'):
    assert sorted(_texts(hf, split)) == sorted(_texts(local, split))


def test_several_fields_join_with_a_blank_line_and_parquet_streams_the_same(pages, tmp_path):
  root, records = pages
  c = _config(root, tmp_path, hf_field='title,text')
  joined = _texts(c, 'train') + _texts(c, 'validation')
  by_title = {r['title']: r for r in records}
  for text in joined:
    title, _, body = text.partition('\n\n')
    assert by_title[title]['text'].strip() == body
  # The blank page keeps its title: a row is left out only when every field is empty.
  assert len(joined) == PAGES
  streamed = _config(root, tmp_path / 'streamed', hf_field='title,text', hf_name='parquet',
                     hf_data_files=str(root / 'pages.parquet'), hf_streaming=True)
  assert _texts(streamed, 'train') == _texts(c, 'train')
  assert _texts(streamed, 'validation') == _texts(c, 'validation')


def test_a_named_validation_split_is_used_as_is(pages, tmp_path):
  root, records = pages
  (root / 'val.jsonl').write_text(json.dumps({'text': 'held out page'}) + '\n', encoding='utf-8')
  c = _config(root, tmp_path, hf_val_split='validation',
              hf_data_files=f'train={root / "pages.jsonl"},validation={root / "val.jsonl"}')
  assert _texts(c, 'validation') == ['held out page']
  assert sorted(_texts(c, 'train')) == sorted(r['text'].strip() for r in records
                                              if r['text'].strip())


def test_exact_resume_through_the_pipeline(pages, tmp_path):
  root, _ = pages
  c = _config(root, tmp_path)
  f = featurize.TokenFeaturizer(tokenizers.ByteTokenizer(), c.model.max_len)
  it = pipeline.make_train_iter(c, f)
  for _ in range(3):
    next(it)
  saved = pipeline.state_to_json(it.get_state())
  want = [next(it) for _ in range(4)]
  restored = pipeline.make_train_iter(c, f)
  restored.set_state(pipeline.state_from_json(saved))
  for batch in want:
    got = next(restored)
    for k in batch:
      np.testing.assert_array_equal(got[k], batch[k])


def test_the_prepared_name_follows_the_documents_not_the_reading_mode(pages, tmp_path):
  root, _ = pages
  name = lambda c: tfds_builders.make_builder('hf', c.data).info.full_name
  base = _config(root, tmp_path)
  assert name(base) == name(_config(root, tmp_path, hf_streaming=True))
  assert name(base) != name(_config(root, tmp_path, hf_field='title'))
  assert name(base) != name(_config(root, tmp_path, val_fraction=0.1))
  edited = root / 'edited.jsonl'
  edited.write_text((root / 'pages.jsonl').read_text(encoding='utf-8'), encoding='utf-8')
  before = name(_config(root, tmp_path, hf_data_files=str(edited)))
  with open(edited, 'a', encoding='utf-8') as f:
    f.write(json.dumps({'text': 'one more page', 'title': 'x'}) + '\n')
  assert name(_config(root, tmp_path, hf_data_files=str(edited))) != before


def test_presets_name_the_papers_corpora_and_mix_like_other_sources():
  c = config_lib.base_config()
  c.data.hf_streaming = True
  spec = hf_datasets.resolve('hf:wikipedia_simple', c.data)
  assert (spec.name, spec.config, spec.fields, spec.streaming) == (
      'wikimedia/wikipedia', '20231101.simple', ('title', 'text'), True)
  assert hf_datasets.resolve('hf:tinystories', c.data).val_split == 'validation'
  c.data.source = 'mix'
  c.data.mix = {'hf:tinystories': 1.0, 'hf:wikipedia_simple': 1.0}
  validate.validate(c)
  c.data.mix = {'hf:tinystories': 1.0, 'hf:wikipedia': 1.0}
  with pytest.raises(validate.ConfigError, match=r"config\.data\.source='hf:wikipedia'.*hf:wikipedia_simple"):
    validate.validate(c)


@pytest.mark.parametrize('data,match', [
    (dict(hf_name=''), r'^config\.data\.hf_name is empty'),
    (dict(hf_data_files=''), r'^config\.data\.hf_data_files is empty'),
    (dict(hf_field=' , '), r'^config\.data\.hf_field is empty'),
    (dict(hf_split=''), r'^config\.data\.hf_split is empty'),
])
def test_incomplete_settings_are_config_errors_naming_the_key(data, match, tmp_path):
  c = _config(tmp_path, tmp_path, **data)
  with pytest.raises(validate.ConfigError, match=match):
    validate.validate(c)


@pytest.mark.parametrize('data,match', [
    (dict(hf_field='body'), r"row 0 has no field 'body' \(its fields: title, text.*set data\.hf_field"),
    (dict(hf_data_files='{root}/nothing-*.jsonl'), r"hf_data_files: '.*nothing-\*\.jsonl' matches no file"),
    (dict(hf_name='parquet'), r"data\.hf_name='parquet' \(split 'train'\): datasets\.load_dataset failed"),
    (dict(hf_val_split='test'), r"names no files for split 'test'"),
])
def test_unreadable_data_is_one_error_naming_the_key(pages, tmp_path, data, match):
  root, _ = pages
  data = {k: v.format(root=root) for k, v in data.items()}
  c = _config(root, tmp_path, **data)
  with pytest.raises(hf_datasets.HfDataError, match=match) as e:
    tfds_builders.prepare('hf', c.data)
  assert '\n' not in str(e.value)


def test_a_non_text_field_is_named(pages, tmp_path):
  root, _ = pages
  (root / 'numbers.jsonl').write_text(json.dumps({'text': 7}) + '\n', encoding='utf-8')
  c = _config(root, tmp_path, hf_data_files=str(root / 'numbers.jsonl'))
  with pytest.raises(hf_datasets.HfDataError, match=r"row 0: field 'text' is int, not a string"):
    tfds_builders.prepare('hf', c.data)


@pytest.mark.slow
def test_training_on_an_hf_source_resumes_with_identical_loss(pages, tmp_path):
  root, _ = pages
  flags = ['--config.data.source=hf', '--config.data.hf_name=parquet',
           f'--config.data.hf_data_files={root / "pages.parquet"}',
           '--config.data.hf_field=title,text', f'--config.data.data_dir={tmp_path / "tfds"}',
           '--config.train.warmup_steps=2', '--config.train.log_every=1',
           '--config.train.eval_every=1000', '--config.train.ckpt_every=3']
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  run_main('configs/baseline.py', straight, *flags, '--config.train.steps=5')
  run_main('configs/baseline.py', resumed, *flags, '--config.train.steps=3')
  run_main('configs/baseline.py', resumed, *flags, '--config.train.steps=5')
  a = {r['step']: r['loss'] for r in read_metrics(straight, 'train')}
  b = {r['step']: r['loss'] for r in read_metrics(resumed, 'train')}
  assert sorted(b) == [1, 2, 3, 4, 5]
  for step in (4, 5):
    assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), (step, a[step], b[step])
