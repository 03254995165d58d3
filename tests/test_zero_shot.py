"""Loaders on the real release files, their errors, and benchmark runs at chance level."""

import json
import pathlib
import subprocess
import sys
import types

import jax
import pytest

from stlm import config as config_lib
from stlm import export
from stlm.data.featurize import TokenFeaturizer
from stlm.eval import zero_shot
from stlm.eval import loaders
from stlm.models import factory
from stlm.tokenizers import ByteTokenizer

# Items per file of ../shared/data/benchmarks (see its README).
COUNTS = {
    'arc/ARC-Easy/ARC-Easy-Train.jsonl': 2251, 'arc/ARC-Easy/ARC-Easy-Dev.jsonl': 570,
    'arc/ARC-Challenge/ARC-Challenge-Train.jsonl': 1119,
    'arc/ARC-Challenge/ARC-Challenge-Dev.jsonl': 299,
    'winogrande/train_xs.jsonl': 160, 'winogrande/train_s.jsonl': 640,
    'hellaswag/hellaswag_val_first1000.jsonl': 1000, 'extra/piqa.jsonl': 1838,
    'extra/copa.jsonl': 100, 'extra/openbook_qa.jsonl': 500,
    'extra/lambada_openai.jsonl': 5153,
}


def _benchmark_of(rel: str) -> str:
  top = rel.split('/')[0]
  if top == 'arc':
    return 'arc_easy' if 'ARC-Easy' in rel else 'arc_challenge'
  if top == 'extra':
    return {'openbook_qa': 'openbookqa', 'lambada_openai': 'lambada'}.get(
        pathlib.Path(rel).stem, pathlib.Path(rel).stem)
  return top


def test_every_file_parses_with_exact_counts(shared_data):
  root = shared_data / 'benchmarks'
  files = sorted(p for p in root.rglob('*') if p.suffix in ('.jsonl', '.csv'))
  seen = {}
  for path in files:
    rel = path.relative_to(root).as_posix()
    if _benchmark_of(rel) not in loaders.KNOWN:
      continue  # a task the log-likelihood loaders do not score (e.g. generative gsm8k)
    items = loaders.parse_file(_benchmark_of(rel), path)
    seen[rel] = len(items)
    if rel.startswith('blimp/'):
      assert len(items) == 200 and {i['paradigm'] for i in items} == {path.stem}
    elif rel.startswith('mmlu/'):
      assert len(items) == 5 and all(0 <= i['label'] < 4 for i in items)
    else:
      assert len(items) == COUNTS[rel], rel
  assert sum(r.startswith('blimp/') for r in seen) == 67
  assert sum(r.startswith('mmlu/dev/') for r in seen) == 57
  assert all(r in seen for r in COUNTS)
  # Default splits: the test files are absent here, so dev/validation is taken.
  assert loaders.find_files('arc_easy', root)[0] == 'dev'
  assert len(loaders.load('blimp', root)) == 13400
  assert len(loaders.load('mmlu', root)) == 285
  fields = {i['field'] for i in loaders.load('blimp', root)}
  assert fields == {'morphology', 'syntax', 'semantics', 'syntax_semantics'}
  arc = loaders.load('arc_easy', root, 'train')
  assert {len(i['choices']) for i in arc} == {3, 4, 5}
  assert any(i['labels'][0] == '1' for i in arc)


def test_release_layouts_and_csv_without_header(tmp_path):
  d = tmp_path / 'data' / 'test'
  d.mkdir(parents=True)
  (d / 'virology_test.csv').write_text('"What, exactly?",a,b,c,d,C\nQ2,a,b,c,d,A\n')
  items = loaders.load('mmlu', tmp_path)
  assert [i['label'] for i in items] == [2, 0] and items[0]['question'] == 'What, exactly?'
  assert items[0]['subject'] == 'virology'
  w = tmp_path / 'winogrande_1.1'
  w.mkdir()
  (w / 'dev.jsonl').write_text(json.dumps(dict(qID='q', sentence='A _ b.', option1='x',
                                               option2='y', answer='2')) + '\n')
  assert loaders.load('winogrande', tmp_path)[0]['label'] == 1
  h = tmp_path / 'hellaswag'
  h.mkdir()
  row = json.dumps(dict(activity_label='a', ctx_a='x', ctx_b='y', ctx='x y',
                        endings=['1', '2', '3', '4'], label='2'))
  (h / 'hellaswag_val.jsonl').write_text(row + '\n' + row + '\n')
  (h / 'hellaswag_val_first1000.jsonl').write_text(row + '\n')  # a subset: not read twice
  assert len(loaders.load('hellaswag', tmp_path)) == 2
  lam = tmp_path / 'lambada_openai'
  lam.mkdir()
  (lam / 'lambada_test.jsonl').write_text(json.dumps(dict(text='He said good bye')) + '\n')
  assert loaders.load('lambada', tmp_path) == [dict(context='He said good', continuation='bye')]


@pytest.mark.parametrize('name,fname,good,bad', [
    ('winogrande', 'dev.jsonl', dict(sentence='A _ b.', option1='x', option2='y', answer='1'),
     dict(sentence='A _ b.', option1='x', option2='y', answer='')),
    ('hellaswag', 'hellaswag_val.jsonl',
     dict(activity_label='a', ctx='c', endings=['1', '2', '3', '4'], label=0), '{not json'),
    ('arc_easy', 'ARC-Easy-Test.jsonl',
     dict(question=dict(stem='q', choices=[dict(text=t, label=l) for t, l in zip('abc', 'ABC')]),
          answerKey='A'),
     dict(question=dict(stem='q', choices=[dict(text='a', label='A')]), answerKey='A')),
])
def test_malformed_line_names_file_and_line(tmp_path, name, fname, good, bad):
  path = tmp_path / fname
  lines = [json.dumps(good)] * 2 + [bad if isinstance(bad, str) else json.dumps(bad)]
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(loaders.DataError, match=f'{fname}:3: '):
    loaders.load(name, tmp_path)


def test_malformed_csv_line(tmp_path):
  (tmp_path / 'dev').mkdir()
  (tmp_path / 'dev' / 'anatomy_dev.csv').write_text('q,a,b,c,d,A\nq,a,b,c,d,E\n')
  with pytest.raises(loaders.DataError, match='anatomy_dev.csv:2: answer'):
    loaders.load('mmlu', tmp_path, 'dev')


def test_missing_data_and_unknown_names(tmp_path):
  with pytest.raises(loaders.DataError) as e:
    loaders.load('arc_easy', tmp_path / 'nowhere')
  assert 'does not exist' in str(e.value)
  assert str(tmp_path / 'nowhere' / 'arc' / 'ARC-Easy' / 'ARC-Easy-Test.jsonl') in str(e.value)
  with pytest.raises(loaders.DataError, match='known benchmarks: blimp, hellaswag'):
    zero_shot.parse_names('blimp,squad')
  assert zero_shot.parse_names('ARC-Easy, mmlu') == ['arc_easy', 'mmlu']


def test_wrong_checkpoint_kinds(tmp_path):
  with pytest.raises(export.BadExportError, match='is not an stlm export'):
    zero_shot.open_checkpoint(str(tmp_path))
  (tmp_path / 'export' / 'params').mkdir(parents=True)
  (tmp_path / 'export' / 'config.json').write_text(json.dumps(dict(model=dict(kind='rnn'), tokenizer=dict(kind='bytes'))))
  with pytest.raises(export.BadExportError, match='training workdir; pass --checkpoint=.*export'):
    zero_shot.open_checkpoint(str(tmp_path))
  with pytest.raises(export.BadExportError, match="kind 'rnn'"):
    zero_shot.open_checkpoint(str(tmp_path / 'export'))
  (tmp_path / 'ckpt' / '300').mkdir(parents=True)
  with pytest.raises(export.BadExportError, match='training checkpoint directory'):
    zero_shot.open_checkpoint(str(tmp_path / 'ckpt'))


@pytest.mark.slow
def test_cli_reports_unknown_benchmark(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'stlm.eval', f'--checkpoint={tmp_path}', '--benchmarks=blimp,foo',
       f'--data_dir={tmp_path}'], capture_output=True, text=True, timeout=120,
      cwd=pathlib.Path(__file__).resolve().parents[1])
  assert proc.returncode != 0
  assert 'Unknown benchmark(s) foo; known benchmarks: blimp' in proc.stderr


@pytest.fixture(scope='module')
def random_exported():
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.name = 'random-tiny'
  c.model.update(vocab_size=257, max_len=128, num_layers=1)
  model = factory.build_model(c.model)
  params = factory.init_params(model, c.model, jax.random.PRNGKey(0))
  tok = ByteTokenizer()
  return types.SimpleNamespace(model=model, params=params, config=c, tokenizer=tok,
                               featurizer=TokenFeaturizer(tok, 128))


@pytest.fixture(scope='module')
def random_scorer(random_exported):
  return zero_shot.Scorer(random_exported.model, random_exported.params,
                           random_exported.featurizer, batch_size=32, min_bucket=64)


@pytest.mark.slow
def test_random_model_is_at_chance(shared_data, random_exported, random_scorer):
  scorer = random_scorer
  res = zero_shot.run_benchmarks(random_exported, 'blimp,arc_easy',
                                  shared_data / 'benchmarks', limit=150, scorer=scorer)
  for name, chance in (('blimp', 0.5), ('arc_easy', 0.25)):
    r = res[name]
    assert r['n'] == 150 and r['chance'] == pytest.approx(chance, abs=0.01)
    assert abs(r['acc'] - r['chance']) <= 3 * r['acc_stderr'], (name, r['acc'])
  assert set(res['blimp']['groups']) == {'field', 'paradigm'}
  assert sum(g['n'] for g in res['blimp']['groups']['paradigm'].values()) == 150
  assert 'acc_norm' in res['arc_easy'] and 'acc_bytes' in res['arc_easy']
  assert scorer.compile_count <= 2
  table = zero_shot.markdown_table('random-tiny', 12345, res, dict(bits_per_byte=8.1234))
  assert table.splitlines()[0] == ('| Model | Parameters | BLiMP | HellaSwag | ARC-easy | '
                                   'WinoGrande | MMLU | Bits per byte |')
  cells = [c.strip() for c in table.splitlines()[2].strip('|').split('|')]
  assert cells[:3] == ['random-tiny', '12345', f"{100 * res['blimp']['acc']:.1f}"]
  assert cells[3:] == ['-', f"{100 * res['arc_easy']['acc']:.1f}", '-', '-', '8.123']


@pytest.mark.slow
def test_mmlu_and_winogrande_runs(shared_data, random_scorer):
  scorer = random_scorer
  root = shared_data / 'benchmarks'
  mmlu = zero_shot.evaluate(scorer, 'mmlu', root, limit=20, mmlu_shots=1)
  assert mmlu['main'] == 'acc' and mmlu['shots'] == 1 and mmlu['chance'] == 0.25
  assert sum(g['n'] for g in mmlu['groups']['subject'].values()) == 20
  wino = zero_shot.evaluate(scorer, 'winogrande', root, limit=10)
  assert wino['n'] == 10 and wino['split'] == 'train_xs' and 0 <= wino['acc'] <= 1
  # The same seed draws the same items.
  assert zero_shot.sample(list(range(100)), 5) == zero_shot.sample(list(range(100)), 5)
