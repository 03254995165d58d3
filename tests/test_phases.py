"""Data phases: the spec, the right source at the right step, exact resume inside a phase and
across a boundary, config errors, phase-tagged metrics and the report's boundary lines."""

import itertools
import json
import pathlib
import signal
import subprocess
import sys

import matplotlib.pyplot as plt
import ml_collections
import numpy as np
import pytest

from stlm import config as config_lib
from stlm import tokenizers
from stlm.config import validate as config_validate
from stlm.data import featurize
from stlm.data import phases
from stlm.data import pipeline
from stlm.data import tfds_builders
from configs.curriculum import STORIES_FILE
from configs.curriculum import WIKI_DIR
from stlm.report import collect
from stlm.report import plots
from stlm.train import loop
from stlm.train import metrics as metrics_lib
from tests import test_pipeline as pipeline_tests
from tests import test_reliability as rel
from tests import main_runs
from tests.conftest import REPO_ROOT

GRAD_ACCUM = 2


def _write_corpus(root: pathlib.Path, letter: str, n: int = 40) -> pathlib.Path:
  """Paragraphs of one letter only, so every byte tells which corpus a segment came from."""
  root.mkdir(parents=True)
  (root / 'docs.txt').write_text(
      '\n\n'.join(f'{letter * (i % 9 + 1)} {letter * 3}{letter * (i % 4)}' for i in range(n)))
  return root


@pytest.fixture(scope='module')
def corpora(tmp_path_factory):
  root = tmp_path_factory.mktemp('phases')
  return {'a': _write_corpus(root / 'a', 'a'), 'b': _write_corpus(root / 'b', 'b'),
          'tfds': root / 'tfds'}


def _config(corpora, spec, steps=6):
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.max_len = 32
  c.train.update(batch_size=2, grad_accum=GRAD_ACCUM, steps=steps, warmup_steps=1)
  c.data.update(data_dir=str(corpora['tfds']), shuffle_buffer=8, val_fraction=0.2, phases=spec)
  c.data.sources = ml_collections.ConfigDict({'a': {'path': str(corpora['a'])},
                                              'b': {'path': str(corpora['b'])}})
  return c


def _featurizer(c):
  return featurize.TokenFeaturizer(tokenizers.ByteTokenizer(), c.model.max_len)


def _source_segments(c, name):
  """Every example (as test_pipeline's segments) of source `name`'s training documents."""
  one = tfds_builders.source_config(c.data, name)
  return set(pipeline_tests._expected(_featurizer(c),
                                      pipeline_tests._split_texts(_as_config(c, one), 'train')))


def _as_config(c, data_cfg):
  out = ml_collections.ConfigDict(c.to_dict())
  out.data = data_cfg
  return out


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# The spec.

def test_parse_reads_sources_weights_and_ends():
  got = phases.parse('a:3, a*1+b*3:5 ,b')
  assert [(p.index, p.label, p.end, p.parts) for p in got] == [
      (0, 'a', 3, (('a', 1.0),)), (1, 'a*1+b*3', 5, (('a', 1.0), ('b', 3.0))),
      (2, 'b', None, (('b', 1.0),))]
  assert phases.parse('') == [] and phases.source_names(got) == ['a', 'b']
  assert phases.boundaries(got) == [3, 5]
  assert [phases.phase_at(got, s).index for s in range(0, 8)] == [0, 0, 0, 0, 1, 1, 2, 2]


def test_temperature_sharpens_or_flattens_weights():
  assert phases.tempered({'a': 1.0, 'b': 4.0}, 1.0) == {'a': 1.0, 'b': 4.0}
  assert phases.tempered({'a': 1.0, 'b': 4.0}, 2.0) == {'a': 1.0, 'b': 2.0}
  assert phases.tempered({'a': 1.0, 'b': 4.0}, 0.5) == {'a': 1.0, 'b': 16.0}


@pytest.mark.parametrize('spec,fragment', [
    ('a:4,b:4', "phase 2 'b:4' ends at step 4, not after the previous end 4"),
    ('a:5,b:3', 'end steps must increase'),
    ('a:3,nope', "unknown source 'nope'"),
    ('a:3,b:5', 'not at train.steps=6'),
    ('a,b', "phase 1 'a' needs an end step"),
    ('a:x,b', 'is not an integer'),
    ('a*0:3,b', 'a weight must be positive'),
])
def test_bad_phase_list_is_a_config_error_naming_the_key(corpora, spec, fragment):
  with pytest.raises(config_validate.ConfigError) as e:
    config_validate.validate(_config(corpora, spec))
  message = str(e.value)
  assert message.startswith(f'config.data.phases={spec!r}: ') and '\n' not in message
  assert fragment in message, message


def test_bad_source_entry_names_its_key(corpora):
  c = _config(corpora, 'a:3,b')
  c.data.sources.b.paht = 'x'
  with pytest.raises(config_validate.ConfigError, match=r"^config\.data\.sources\.b\.paht='x'"):
    config_validate.validate(c)
  c = _config(corpora, 'a:3,b')
  c.data.sources.b.source = 'mix'
  with pytest.raises(config_validate.ConfigError, match=r"^config\.data\.sources\.b\.source"):
    config_validate.validate(c)
  c = _config(corpora, 'a:3,b')
  c.data.mix_temperature = 0.0
  with pytest.raises(config_validate.ConfigError, match=r'^config\.data\.mix_temperature=0\.0'):
    config_validate.validate(c)


def test_bad_phase_list_from_the_command_line_is_one_line(tmp_path):
  proc = rel.run_main('--config=configs/curriculum.py', f'--workdir={tmp_path / "run"}',
                      '--config.data.phases=stories:200,wiki:100')
  rel.assert_one_line_error(proc, 'config.data.phases=', 'end steps must increase')
  assert not (tmp_path / 'run').exists()


# The iterator.

def test_the_right_source_at_the_right_step(corpora):
  c = _config(corpora, 'a:2,a+b*3:4,b', steps=6)
  config_validate.validate(c)
  seg_a, seg_b = _source_segments(c, 'a'), _source_segments(c, 'b')
  assert seg_a and seg_b and not seg_a & seg_b
  it = pipeline.make_train_iter(c, _featurizer(c))
  mixed = {'a': 0, 'b': 0}
  for k in range(7 * GRAD_ACCUM):
    step = k // GRAD_ACCUM + 1
    assert it.phase == phases.phase_at(phases.parse(c.data.phases), step).index
    segs = pipeline_tests._segments(next(it))
    if step <= 2:
      assert set(segs) <= seg_a, step
    elif step <= 4:
      assert set(segs) <= seg_a | seg_b, step
      mixed['a'] += len(set(segs) & seg_a)
      mixed['b'] += len(set(segs) & seg_b)
    else:   # the last phase runs on past its (left out) end
      assert set(segs) <= seg_b, step
  assert mixed['a'] > 0 and mixed['b'] > 0


def test_one_phase_reads_exactly_what_the_plain_source_reads(corpora):
  phased = _config(corpora, 'a')
  plain = _config(corpora, '')
  plain.data.update(source='local', path=str(corpora['a']))
  f = _featurizer(plain)
  for x, y in zip(itertools.islice(pipeline.make_train_iter(phased, f), 5),
                  itertools.islice(pipeline.make_train_iter(plain, f), 5)):
    _assert_same(x, y)


@pytest.mark.parametrize('drawn', [
    3,                    # inside the first phase (step 2, half way through its micro-batches)
    2 * GRAD_ACCUM,       # right at the boundary: every batch of phase 0 drawn, none of phase 1
    2 * GRAD_ACCUM + 1,   # one batch into the second phase
    4 * GRAD_ACCUM + 3,   # inside the last phase, after the mixed one
])
def test_restore_inside_a_phase_and_across_a_boundary_is_exact(corpora, drawn):
  c = _config(corpora, 'a:2,a+b*3:4,b', steps=6)
  f = _featurizer(c)
  it = pipeline.make_train_iter(c, f)
  for _ in range(drawn):
    next(it)
  saved = pipeline.state_to_json(it.get_state())
  assert json.loads(saved)['drawn'] == drawn
  expected = [next(it) for _ in range(5)]   # crosses the next boundary from the first cases
  restored = pipeline.make_train_iter(c, f)
  next(restored)   # where it was before the restore must not matter
  restored.set_state(pipeline.state_from_json(saved))
  for want in expected:
    _assert_same(next(restored), want)


def test_evaluation_reads_every_phase_source_held_out(corpora):
  c = _config(corpora, 'a:3,b')
  val = set(pipeline_tests._split_texts(c, 'validation'))
  one = {n: set(pipeline_tests._split_texts(_as_config(c, tfds_builders.source_config(c.data, n)),
                                            'validation')) for n in ('a', 'b')}
  assert val == one['a'] | one['b'] and one['a'] and one['b']
  fp = tfds_builders.fingerprint(c.data)
  assert sorted(fp) == ['a', 'b'] and fp['a']['dataset'] != fp['b']['dataset']


# Metrics and the report.

def test_metrics_rows_carry_the_phase(tmp_path):
  specs = phases.parse('a:3,b')
  writer = metrics_lib.MetricsWriter(str(tmp_path), 6, 0, phases=specs)
  for step in (0, 3, 4):
    writer.write(step, 'train', {'loss': 1.0})
  writer.close()
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['phase'], r['phase_name']) for r in rows] == [
      (0, 0, 'a'), (3, 0, 'a'), (4, 1, 'b')]
  plain = metrics_lib.MetricsWriter(str(tmp_path / 'plain'), 6, 0)
  plain.write(1, 'train', {'loss': 1.0})
  plain.close()
  assert 'phase' not in json.loads((tmp_path / 'plain' / 'metrics.jsonl').read_text())


def test_loss_plots_mark_phase_boundaries(tmp_path, monkeypatch):
  def make_run(name, spec):
    d = tmp_path / name
    d.mkdir()
    rows = [dict(step=s, split=split, time=1.0 + s, loss=5.0 - s / 100, bits_per_byte=3.0)
            for s in range(0, 301, 50) for split in ('train', 'validation')]
    (d / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    config = dict(name=name, model=dict(max_len=128), data=dict(phases=spec),
                  train=dict(batch_size=8, grad_accum=1, steps=300))
    (d / 'run.json').write_text(json.dumps(dict(status='finished', config=config)))
  make_run('curriculum', 'stories:100,wiki:200,stories')
  make_run('plain', '')
  runs = collect.scan(tmp_path)
  assert [r.phase_boundaries for r in runs] == [[100, 200], []]
  figures = []
  monkeypatch.setattr(plots.plt, 'close', figures.append)
  plots.training_loss(runs, str(tmp_path / 'loss.png'))
  plots.validation_vs_tokens(runs, str(tmp_path / 'val.png'))
  for fig, scale in zip(figures, (1, 1024)):
    vertical = [l for l in fig.axes[0].get_lines() if len(set(l.get_xdata())) == 1]
    assert sorted(l.get_xdata()[0] for l in vertical) == [100 * scale, 200 * scale]
    plt.close(fig)
  assert (tmp_path / 'loss.png').stat().st_size > 1000


# Training: stopped or killed, then resumed, inside a phase and at a boundary.

def _train_overrides(corpora):
  """configs/curriculum.py, shrunk as test_reliability's reference, on the two test corpora,
  with a checkpoint and an evaluation line every step. A constant learning rate, so a run
  stopped early by a smaller train.steps trains its steps exactly as the full run does."""
  return {**rel.OVERRIDES, 'data.data_dir': str(corpora['tfds']), 'train.ckpt_every': 1,
          'train.schedule': 'constant',
          'train.eval_every': 1, 'data.phases': 'stories:3,wiki',
          'data.sources.stories.path': str(corpora['a']),
          'data.sources.wiki.path': str(corpora['b'])}


def _train_config(corpora, steps):
  """What main.py builds from configs/curriculum.py and `_train_overrides` (in-process)."""
  o = _train_overrides(corpora)
  c = rel.make_config(o['data.data_dir'], **{'train.steps': steps, 'train.ckpt_every': 1,
                                              'train.eval_every': 1,
                                              'train.schedule': 'constant'})
  c.name = 'curriculum'
  c.data.phases = o['data.phases']
  c.data.sources = ml_collections.ConfigDict({
      'stories': {'path': o['data.sources.stories.path']},
      'wiki': {'path': o['data.sources.wiki.path']}})
  return c


def _spawn(corpora, workdir):
  flags = [f'--config.{k}={v}' for k, v in _train_overrides(corpora).items()]
  return subprocess.Popen(
      [sys.executable, 'main.py', f'--workdir={workdir}', '--config=configs/curriculum.py',
       *flags], cwd=REPO_ROOT, env=rel.env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope='module')
def phased_reference(corpora, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('phased_reference') / 'run'
  loop.train(_train_config(corpora, rel.STEPS), str(workdir))
  return workdir


def _assert_equals_reference(workdir, reference):
  assert rel.losses(workdir) == rel.losses(reference)   # every step, exactly
  rel.assert_same_params(rel.export_params(workdir), rel.export_params(reference))
  rel.assert_each_step_once(workdir)
  assert [r['phase'] for r in rel.rows(workdir)] == [0, 0, 0, 1, 1, 1]


@pytest.mark.slow
@pytest.mark.parametrize('stop_at', [2, 3], ids=['inside_phase', 'at_boundary'])
def test_stopped_and_resumed_run_equals_uninterrupted(corpora, phased_reference, tmp_path,
                                                      stop_at):
  workdir = tmp_path / 'run'
  loop.train(_train_config(corpora, stop_at), str(workdir))
  loop.train(_train_config(corpora, rel.STEPS), str(workdir))
  _assert_equals_reference(workdir, phased_reference)


@pytest.mark.slow
@pytest.mark.parametrize('marker', ['step 1: validation', 'step 3: validation'],
                         ids=['kill_in_first_phase', 'kill_at_or_after_boundary'])
def test_killed_and_resumed_run_equals_uninterrupted(corpora, phased_reference, tmp_path,
                                                     marker):
  # The kill lands at the marker or a little later; the resume starts from the newest
  # intact checkpoint (one per step), wherever in the phases that is.
  workdir = tmp_path / 'run'
  out, rc = rel.signal_when(_spawn(corpora, workdir), marker, signal.SIGKILL)
  assert rc == -signal.SIGKILL, out[-2000:]
  assert not (workdir / 'export').exists(), 'killed after the end: nothing was resumed'
  loop.train(_train_config(corpora, rel.STEPS), str(workdir))
  _assert_equals_reference(workdir, phased_reference)


# The experiment command.

@pytest.mark.parametrize('flag,fragment', [
    ('--arms=phases,nope', "--arms: unknown 'nope'"),
    pytest.param('--data_dir=/nonexistent', '--data_dir=/nonexistent has no corpus/tinystories',
                 marks=pytest.mark.slow),
    pytest.param('--switch=400', '--switch=400 must be in [0, --steps)', marks=pytest.mark.slow),
])
def test_curriculum_experiment_bad_flags_are_one_line(tmp_path, flag, fragment):
  proc = subprocess.run(
      [sys.executable, '-m', 'stlm.experiments.curriculum', f'--workdir={tmp_path / "w"}',
       '--steps=400', flag], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=rel.env())
  rel.assert_one_line_error(proc, fragment)
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_curriculum_config_trains_on_the_shared_corpus(shared_data, tmp_path):
  workdir = tmp_path / 'run'
  main_runs.run_main('configs/curriculum.py', workdir,
               f'--config.data.sources.stories.path={shared_data / STORIES_FILE}',
               f'--config.data.sources.wiki.path={shared_data / WIKI_DIR}',
               f'--config.data.data_dir={tmp_path / "tfds"}', '--config.train.steps=4',
               '--config.train.warmup_steps=1', '--config.data.phases=stories:2,wiki',
               '--config.train.log_every=1',
               '--config.train.eval_every=4', '--config.train.eval_batches=1')
  rows = main_runs.read_metrics(workdir, 'train')
  assert [(r['step'], r['phase_name']) for r in rows] == [
      (1, 'stories'), (2, 'stories'), (3, 'wiki'), (4, 'wiki')]
  assert (workdir / 'export').is_dir()
