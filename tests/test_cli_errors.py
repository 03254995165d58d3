"""Every command's bad input gives one line: `error: ...`, a non-zero exit, no traceback.

Each case runs the real command in a subprocess on one shared set of tiny exports (a causal
baseline, a masked-LM encoder, a byte-pool model; parameters are zeros, since no case needs
trained values) and checks that nothing it did not create changed: neither the exports nor the
case's own inputs, and no partial output or probe file is left behind.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from stlm import cli_errors
from tests.conftest import REPO_ROOT

SMALL = dict(num_layers=1, hidden_dim=32, num_heads=2, num_kv_heads=1, ffn_dim=64, max_len=16)


def _save_zero_export(config_module, directory, **model):
  # pylint: disable=g-import-not-at-top  (jax only for the fixture, not at collection)
  import flax.linen as nn
  import numpy as np
  import jax
  from stlm import export
  from stlm.models import factory
  c = config_module.get_config('tiny')
  c.tokenizer.kind = 'bytes'
  c.model.update(vocab_size=257, **model)
  abstract = nn.unbox(factory.abstract_params(factory.build_model(c.model), c.model))
  export.save_export(str(directory), jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                                   abstract), c)


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  """Paths every case may read and none may change."""
  from configs import baseline, byte_pool, encoder  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('shared')
  _save_zero_export(baseline, root / 'lm' / 'export', **SMALL)     # root/lm: a workdir
  _save_zero_export(encoder, root / 'encoder', **dict(SMALL, num_kv_heads=2))
  _save_zero_export(byte_pool, root / 'byte_pool', num_layers=1)
  (root / 'text.txt').write_text('A short document to score.\n')
  (root / 'empty.txt').write_text('')
  (root / 'train.csv').write_text('"3","Wall St.","Shares rose."\n')
  (root / 'a_file').write_text('not a directory')
  (root / 'no_runs').mkdir()
  data_root = root / 'data_root'   # what tiny_encoders needs to find, all present
  for sub in ('corpus/wikipedia_en', 'corpus/nltk/state_union', 'corpus/lambada',
              'corpus/tinystories', 'classification/agnews', 'classification/dbpedia',
              'classification/fewrel'):
    (data_root / sub).mkdir(parents=True)
  (data_root / 'corpus/tinystories/train_head_cased.txt').write_text('Once upon a time.\n')
  (data_root / 'classification/agnews/jointmatch_dev_8000.csv').write_text('label,content\n')
  (root / 'other_study').mkdir()   # a tiny_encoders --out made for another design
  (root / 'other_study' / 'design.json').write_text(
      '{"design": {"seeds": 9}, "agnews_test": "jointmatch_dev_8000.csv"}')
  return root


def _damage(export_dir: pathlib.Path, how: str) -> None:
  params = export_dir / 'params'
  data_files = sorted(params.glob('**/d/*'), key=lambda p: p.stat().st_size)
  if how == 'config_not_json':
    (export_dir / 'config.json').write_text('{"model": ')
  elif how == 'no_params':
    shutil.rmtree(params)
  elif how == 'no_metadata':
    (params / '_METADATA').unlink()
  elif how == 'truncated_data':
    with open(data_files[-1], 'r+b') as f:
      f.truncate(data_files[-1].stat().st_size // 2)
  elif how == 'missing_data':
    data_files[-1].unlink()
  elif how == 'wrong_shape':
    config = json.loads((export_dir / 'config.json').read_text())
    config['model']['hidden_dim'] = 64
    (export_dir / 'config.json').write_text(json.dumps(config))
  else:
    raise ValueError(how)


def slow(*case):
  """A case run only without -m "not slow": the fast loop keeps at least one of each kind."""
  return (*case, 'slow')


E, G, X, C, R = 'stlm.eval', 'stlm.generate', 'stlm.export', 'stlm.classify', 'stlm.report'
H, Q, T = 'stlm.eval.harness', 'stlm.experiments.equal_core', 'stlm.experiments.tiny_encoders'
NO_BENCH = '--benchmarks='   # eval's default benchmarks need --data_dir
TEXT_ONLY = [NO_BENCH, '--text={shared}/text.txt']   # eval scoring one small file
AGNEWS = ['--task=agnews', '--train_file={shared}/train.csv']
EQ = ['--data={shared}/text.txt', '--workdir={tmp}/eq']
TE = ['--data_root={shared}/data_root', '--out={tmp}/te']

# (id, module, args, fragments of the error line, damage applied to a copy of the LM export
# at {tmp}/damaged). Placeholders: {shared} (the fixture), {lm} (its causal export), {tmp}
# (the case's own directory).
CASES = [
    # stlm.eval
    ('eval-missing-checkpoint', E, ['--checkpoint={tmp}/nowhere', *TEXT_ONLY],
     ['--checkpoint={tmp}/nowhere does not exist'], None),
    slow('eval-not-an-export', E, ['--checkpoint={shared}/no_runs', *TEXT_ONLY],
         ['--checkpoint={shared}/no_runs is not an stlm export', 'config.json is missing'], None),
    ('eval-workdir-not-export', E, ['--checkpoint={shared}/lm', *TEXT_ONLY],
     ['training workdir; pass --checkpoint={shared}/lm/export'], None),
    ('eval-config-not-json', E, ['--checkpoint={tmp}/damaged', *TEXT_ONLY],
     ['{tmp}/damaged/config.json is not valid JSON'], 'config_not_json'),
    slow('eval-params-missing', E, ['--checkpoint={tmp}/damaged', *TEXT_ONLY],
         ['is damaged: {tmp}/damaged/params is missing'], 'no_params'),
    ('eval-truncated-data-file', E, ['--checkpoint={tmp}/damaged', *TEXT_ONLY],
     ['is damaged: {tmp}/damaged/params/', 'were written'], 'truncated_data'),
    ('eval-encoder-export', E, ['--checkpoint={shared}/encoder', *TEXT_ONLY],
     ['--checkpoint={shared}/encoder holds a bidirectional model'], None),
    ('eval-unknown-benchmark', E,
     ['--checkpoint={lm}', '--benchmarks=blimp,squad', '--data_dir={tmp}'],
     ['--benchmarks=blimp,squad: Unknown benchmark(s) squad'], None),
    ('eval-unknown-split', E,
     ['--checkpoint={lm}', '--benchmarks=piqa:nosplit', '--data_dir={tmp}'],
     ["piqa has no split 'nosplit'"], None),
    slow('eval-missing-data-dir', E,
         ['--checkpoint={lm}', '--benchmarks=piqa', '--data_dir={tmp}/nowhere'],
         ['No piqa data found under {tmp}/nowhere', 'does not exist'], None),
    ('eval-data-dir-without-files', E,
     ['--checkpoint={lm}', '--benchmarks=piqa', '--data_dir={tmp}'],
     ['No piqa data found under {tmp}'], None),
    slow('eval-missing-text-file', E, ['--checkpoint={lm}', NO_BENCH, '--text={tmp}/nowhere.txt'],
         ['--text={tmp}/nowhere.txt does not exist'], None),
    ('eval-empty-text-file', E, ['--checkpoint={lm}', NO_BENCH, '--text={shared}/empty.txt'],
     ['--text={shared}/empty.txt holds no text'], None),
    ('eval-output-dir-missing', E, ['--checkpoint={lm}', *TEXT_ONLY,
                                    '--output={tmp}/nowhere/results.json'],
     ['--output={tmp}/nowhere/results.json: the directory {tmp}/nowhere does not exist'], None),
    slow('eval-bad-stride', E, ['--checkpoint={lm}', *TEXT_ONLY, '--stride=0',
                                '--output={tmp}/results.json'],
         ['--stride=0 must be in 1..16'], None),
    slow('eval-no-checkpoint-flag', E, [NO_BENCH],
         ['Flag --checkpoint must have a value'], None),
    # stlm.generate
    slow('generate-missing-checkpoint', G, ['--checkpoint={tmp}/nowhere', '--prompt=Hi'],
         ['--checkpoint={tmp}/nowhere does not exist'], None),
    ('generate-empty-prompt', G, ['--checkpoint={lm}', '--prompt='], ['--prompt is empty'], None),
    ('generate-encoder-export', G, ['--checkpoint={shared}/encoder', '--prompt=Hi'],
     ["model.kind='encoder' model, which does not generate text"], None),
    slow('generate-bad-max-bytes', G, ['--checkpoint={lm}', '--prompt=Hi', '--max_bytes=0'],
         ['--max_bytes=0 must be >= 1'], None),
    slow('generate-params-metadata-missing', G, ['--checkpoint={tmp}/damaged', '--prompt=Hi'],
         ['{tmp}/damaged/params/_METADATA is missing'], 'no_metadata'),
    ('generate-missing-data-file', G, ['--checkpoint={tmp}/damaged', '--prompt=Hi'],
     ['is damaged: {tmp}/damaged/params/', 'is missing'], 'missing_data'),
    # stlm.export
    slow('export-missing-checkpoint', X, ['--checkpoint={tmp}/nowhere', '--out={tmp}/hf'],
         ['--checkpoint={tmp}/nowhere does not exist'], None),
    ('export-hf-of-an-encoder', X,
     ['--checkpoint={shared}/encoder', '--format=hf', '--out={tmp}/hf'],
     ["--format=hf of --checkpoint={shared}/encoder: model.kind='encoder': no Hugging Face"],
     None),
    slow('export-out-is-a-file', X,
         ['--checkpoint={lm}', '--format=safetensors', '--out={shared}/a_file'],
         ['--out={shared}/a_file is a file'], None),
    ('export-out-is-the-checkpoint', X, ['--checkpoint={lm}', '--format=safetensors', '--out={lm}'],
     ['is the --checkpoint directory'], None),
    slow('export-out-unwritable', X,
         ['--checkpoint={lm}', '--format=safetensors', '--out=/proc/stlm_out'],
         ['--out=/proc/stlm_out: cannot write in /proc'], None),
    ('export-params-of-another-shape', X, ['--checkpoint={tmp}/damaged', '--format=safetensors',
                                           '--out={tmp}/st'],
     ['has shape (257, 32), the model of config.json needs (257, 64)'], 'wrong_shape'),
    # stlm.classify
    slow('classify-missing-checkpoint', C, ['--checkpoint={tmp}/nowhere', *AGNEWS],
         ['--checkpoint={tmp}/nowhere does not exist'], None),
    ('classify-byte-pool-export', C, ['--checkpoint={shared}/byte_pool', *AGNEWS],
     ["model.kind='byte_pool' model, which has no features()"], None),
    ('classify-committee-member-damaged', C, ['--committee={lm},{tmp}/damaged', *AGNEWS],
     ['--committee={tmp}/damaged is damaged', 'config.json is not valid JSON'], 'config_not_json'),
    ('classify-missing-data-dir', C,
     ['--checkpoint={lm}', '--task=agnews', '--data_dir={tmp}/nowhere'],
     ['--data_dir={tmp}/nowhere does not exist'], None),
    slow('classify-data-dir-without-files', C,
         ['--checkpoint={lm}', '--task=dbpedia', '--data_dir={tmp}'],
         ['no dbpedia train file'], None),
    ('classify-empty-train-file', C, ['--checkpoint={lm}', '--task=agnews',
                                      '--train_file={shared}/empty.txt'],
     ['--train_file: {shared}/empty.txt is empty'], None),
    ('classify-output-dir-missing', C,
     ['--checkpoint={lm}', *AGNEWS, '--output={tmp}/nowhere/r.json'],
     ['--output={tmp}/nowhere/r.json: the directory {tmp}/nowhere does not exist'], None),
    ('classify-scratch-without-config', C, ['--checkpoint=scratch', *AGNEWS],
     ['--checkpoint=scratch needs --config'], None),
    slow('classify-bad-fewrel-setting', C, ['--checkpoint={lm}', '--task=fewrel',
                                            '--test_file={shared}/text.txt',
                                            '--fewrel_settings=5way'],
         ["--fewrel_settings: '5way'"], None),
    slow('classify-empty-fewrel-file', C, ['--checkpoint={lm}', '--task=fewrel',
                                           '--test_file={shared}/empty.txt'],
         ['--test_file: {shared}/empty.txt is empty'], None),
    ('classify-unknown-task', C, ['--checkpoint={lm}', '--task=imdb'],
     ['--task=imdb: value should be one of'], None),
    # stlm.report
    ('report-missing-runs-dir', R, ['{tmp}/nowhere', '--out={tmp}/report'],
     ['{tmp}/nowhere is not a directory of runs'], None),
    ('report-no-runs', R, ['{shared}/no_runs', '--out={tmp}/report'],
     ['no runs under {shared}/no_runs'], None),
    ('report-unknown-reference', R, ['{shared}', '--reference=nosuch', '--out={tmp}/report'],
     ['--reference=nosuch: no such run'], None),
    ('report-out-is-a-file', R, ['{shared}', '--out={shared}/a_file'],
     ['--out={shared}/a_file is a file'], None),
    ('report-no-runs-argument', R, ['--out={tmp}/report'], ['usage: python -m stlm.report'], None),
    # the lm-evaluation-harness adapter
    slow('harness-missing-checkpoint', H, ['--model_args', 'checkpoint={tmp}/nowhere', '--tasks',
                                           'stlm_piqa', '--data_dir', '{tmp}'],
         ['--model_args checkpoint={tmp}/nowhere does not exist'], None),
    ('harness-no-checkpoint', H, ['--model_args', 'batch_size=8', '--tasks', 'stlm_piqa'],
     ['--model_args must name checkpoint='], None),
    slow('harness-encoder-export', H, ['--model_args', 'checkpoint={shared}/encoder', '--tasks',
                                       'stlm_piqa', '--data_dir', '{tmp}'],
         ['--model_args checkpoint={shared}/encoder holds a bidirectional model'], None),
    ('harness-unknown-task', H, ['--model_args', 'checkpoint={lm}', '--tasks', 'stlm_squad'],
     ["--tasks: no task 'stlm_squad'"], None),
    slow('harness-missing-data-dir', H, ['--model_args', 'checkpoint={lm}', '--tasks', 'stlm_piqa',
                                         '--data_dir={tmp}/nowhere'],
         ['--data_dir={tmp}/nowhere does not exist'], None),
    slow('harness-data-dir-without-files', H, ['--model_args', 'checkpoint={lm}', '--tasks',
                                               'stlm_piqa', '--data_dir={tmp}'],
         ['No piqa data found under {tmp}'], None),
    # the experiment commands
    ('equal-core-unknown-row', Q, ['--rows=baseline,nosuch', *EQ],
     ["--rows: unknown 'nosuch'"], None),
    slow('equal-core-missing-data', Q, ['--data={tmp}/nowhere', '--workdir={tmp}/eq'],
         ['--data={tmp}/nowhere does not exist'], None),
    slow('equal-core-bad-core', Q, ['--core=4by128', *EQ], ['--core=4by128'], None),
    slow('equal-core-workdir-is-a-file', Q,
         ['--data={shared}/text.txt', '--workdir={shared}/a_file'],
         ['--workdir={shared}/a_file is a file'], None),
    ('tiny-encoders-missing-data-root', T, ['--data_root={tmp}/nowhere', '--out={tmp}/te'],
     ['--data_root={tmp}/nowhere does not exist'], None),
    ('tiny-encoders-data-root-incomplete', T, ['--data_root={tmp}', '--out={tmp}/te'],
     ["--corpora: corpus 'wikipedia' needs {tmp}/corpus/wikipedia_en"], None),
    ('tiny-encoders-missing-agnews-test', T, [*TE, '--agnews_test=nowhere.csv'],
     ['--agnews_test=nowhere.csv: no such file'], None),
    ('tiny-encoders-unknown-task', T, [*TE, '--tasks=agnews,imdb'],
     ["--tasks: unknown task 'imdb'"], None),
    ('tiny-encoders-unknown-corpus', T, [*TE, '--corpora=wikipedia,reddit'],
     ["--corpora: unknown corpus 'reddit'"], None),
    ('tiny-encoders-one-seed', T, [*TE, '--seeds=1'], ['--seeds=1 is out of range'], None),
    ('tiny-encoders-bad-size', T, [*TE, '--wiki_bytes=1e5,big'],
     ['--wiki_bytes=1e5,big: not all int values'], None),
    ('tiny-encoders-out-of-another-design', T,
     ['--data_root={shared}/data_root', '--out={shared}/other_study'],
     ['--out={shared}/other_study holds a study of another design', 'seeds'], None),
    ('tiny-encoders-no-wikipedia', T, [*TE, '--corpora=lambada,tinystories'],
     ['--corpora must include wikipedia'], None),
    ('tiny-encoders-shard-out-of-range', T, [*TE, '--shard=2/2'],
     ['--shard=2/2: needs 0 <= i < n'], None),
    ('tiny-encoders-shard-malformed', T, [*TE, '--shard=half'],
     ['--shard=half: expected i/n'], None),
    ('tiny-encoders-out-is-a-file', T, ['--data_root={shared}/data_root', '--out={shared}/a_file'],
     ['--out={shared}/a_file is a file'], None),
]


def _tree_state(root: pathlib.Path) -> dict:
  """Every file and directory under root: a file's size and mtime (directories by name only,
  since a write probe that leaves nothing still touches its directory's mtime)."""
  state = {}
  for path in sorted(root.rglob('*')):
    st = path.stat()
    state[str(path.relative_to(root))] = None if path.is_dir() else (st.st_size, st.st_mtime_ns)
  return state


# What test tooling itself writes into the repository root while the suite runs; with two
# xdist workers another worker may create one during a case.
TOOL_CACHES = ('.pytest_cache', '.hypothesis', '.benchmarks')


def _repo_root_entries() -> list[str]:
  return sorted(n for n in os.listdir(REPO_ROOT) if n not in TOOL_CACHES)


def run_command(module, args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, *fragments):
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0, out[-3000:]
  assert 'Traceback' not in out, out[-3000:]
  errors = [l for l in out.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, out[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], (fragment, errors[0])


def _prepare(shared, tmp_path, args, fragments, damage):
  if damage:
    shutil.copytree(shared / 'lm' / 'export', tmp_path / 'damaged')
    _damage(tmp_path / 'damaged', damage)
  names = dict(shared=shared, lm=shared / 'lm' / 'export', tmp=tmp_path)
  return [a.format(**names) for a in args], [f.format(**names) for f in fragments]


@pytest.mark.parametrize('module,args,fragments,damage', [
    pytest.param(*c[1:5], id=c[0], marks=[pytest.mark.slow] if c[5:] else []) for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(shared, tmp_path, module, args,
                                                      fragments, damage):
  args, fragments = _prepare(shared, tmp_path, args, fragments, damage)
  before = (_tree_state(shared), _tree_state(tmp_path), _repo_root_entries())
  proc = run_command(module, args)
  assert_one_line_error(proc, *fragments)
  after = (_tree_state(shared), _tree_state(tmp_path), _repo_root_entries())
  assert after == before   # no input touched, no partial output or probe left


def test_the_cases_are_distinct_and_cover_every_command():
  assert len({c[0] for c in CASES}) == len(CASES) >= 25
  assert len({(c[1], tuple(c[2]), c[4]) for c in CASES}) == len(CASES)
  assert {c[1] for c in CASES} == {E, G, X, C, R, H, Q, T}
  fast = [c for c in CASES if not c[5:]]
  assert len(fast) >= 25 and {c[1] for c in fast} == {E, G, X, C, R, H, Q, T}


def test_verbosity_1_shows_the_traceback_above_the_one_line(shared, tmp_path):
  proc = run_command(G, [f'--checkpoint={tmp_path / "nowhere"}', '--prompt=Hi', '--verbosity=1'])
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0
  assert 'Traceback' in out and 'BadExportError' in out, out[-3000:]
  assert out.rstrip().splitlines()[-1].startswith('error: --checkpoint='), out[-3000:]


def test_a_bug_keeps_its_traceback(monkeypatch):
  """Only bad input is shortened: any other exception propagates unchanged."""
  def buggy():
    with cli_errors.one_line_errors():
      raise TypeError('a bug in model code')
  with pytest.raises(TypeError, match='a bug in model code'):
    buggy()
  monkeypatch.setattr(sys, 'argv', ['prog'])
  with pytest.raises(SystemExit) as e:
    with cli_errors.one_line_errors():
      raise cli_errors.FlagError('--x=1 must be >= 2')
  assert e.value.code == cli_errors.ERROR_EXIT_CODE


def test_atomic_outputs_leave_nothing_on_failure(tmp_path):
  target = tmp_path / 'out.json'
  target.write_text('old')
  with pytest.raises(RuntimeError):
    with cli_errors.atomic_file(str(target)) as f:
      f.write('half')
      raise RuntimeError('killed mid-write')
  assert target.read_text() == 'old' and sorted(os.listdir(tmp_path)) == ['out.json']
  out_dir = tmp_path / 'report'
  with pytest.raises(RuntimeError):
    with cli_errors.staged_dir(str(out_dir)) as staging:
      pathlib.Path(staging, 'index.html').write_text('half')
      raise RuntimeError('killed mid-write')
  assert sorted(os.listdir(tmp_path)) == ['out.json']
  with cli_errors.staged_dir(str(out_dir)) as staging:
    pathlib.Path(staging, 'index.html').write_text('whole')
  assert (out_dir / 'index.html').read_text() == 'whole'
  assert sorted(os.listdir(tmp_path)) == ['out.json', 'report']
