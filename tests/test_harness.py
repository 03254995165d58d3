"""lm-evaluation-harness adapter vs the built-in scorer: same requests, same numbers.

The harness runs its own task machinery (templates, request building, metrics) on the task
files in stlm/eval/harness_tasks; the built-in path runs stlm.eval.prompts. On the first 50
items of each Table 2 benchmark the per-item log-likelihoods must agree to 1e-5 and the
accuracies exactly.
"""

import types

import flax.linen as nn
import numpy as np
import pytest

from stlm import config as config_lib
from stlm import generate
from stlm import tokenizers
from stlm.eval import zero_shot
from stlm.eval import harness
from stlm.eval import loaders
from stlm.eval import metrics
from stlm.models import factory
from tests.conftest import require_shared_data
from tests.param_fill import fill_like

N_ITEMS = 50
# (benchmark, split of the local release, harness task)
CASES = (('blimp', 'train', 'stlm_blimp'), ('hellaswag', 'val', 'stlm_hellaswag'),
         ('arc_easy', 'dev', 'stlm_arc_easy'), ('winogrande', 'train_xs', 'stlm_winogrande'),
         ('mmlu', 'dev', 'stlm_mmlu'))


def tiny_exported(hidden=32, seed=0):
  """A random tiny baseline over bytes (numpy-filled params: no init compile).

  Bytes, not GPT-2: the agreement under test is about requests and aggregation, and a
  50257-wide output layer made this test take minutes on 2 shared cores (2 items/s).
  """
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.name = 'random-tiny'
  c.tokenizer.kind = 'bytes'
  tok = tokenizers.build_tokenizer(c.tokenizer)
  c.model.update(hidden_dim=hidden, num_heads=4, num_kv_heads=2, ffn_dim=2 * hidden,
                 num_layers=1, max_len=128, vocab_size=tok.vocab_size)
  model = factory.build_model(c.model)
  params = fill_like(nn.unbox(factory.abstract_params(model, c.model)), seed)
  # Embeddings at unit scale, so log-likelihoods differ between choices by whole nats.
  params['embed']['embedding'] = params['embed']['embedding'] * 20.0
  return types.SimpleNamespace(model=model, params=params, config=c, tokenizer=tok,
                               featurizer=factory.make_featurizer(c, tok))


@pytest.fixture(scope='module')
def setup():
  root = require_shared_data() / 'benchmarks'
  exported = tiny_exported()
  scorer = zero_shot.make_scorer(exported, batch_size=64)
  return root, exported, scorer


@pytest.fixture(scope='module')
def harness_out(setup):
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval import evaluator  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  root, exported, scorer = setup
  # The harness's environment report (pip list, torch's collect_env) takes tens of seconds
  # and says nothing about scores; skip it for this run only.
  mp = pytest.MonkeyPatch()
  mp.setattr(evaluator, 'add_env_info', lambda results: None)
  lm = harness.StlmLM(exported=exported, scorer=scorer)
  # include_defaults=False: indexing the harness's thousands of built-in tasks takes minutes.
  tm = TaskManager(include_path=harness.TASKS_DIR, include_defaults=False,
                   metadata={'data_dir': str(root)})
  out = lm_eval.simple_evaluate(model=lm, tasks=[t for _, _, t in CASES], limit=N_ITEMS,
                                 task_manager=tm, log_samples=True, bootstrap_iters=0,
                                 torch_random_seed=None)  # no torch import: nothing uses it
  mp.undo()
  return out


@pytest.mark.slow
@pytest.mark.parametrize('name,split,task', CASES)
def test_harness_matches_builtin_scorer(setup, harness_out, name, split, task):
  root, _, scorer = setup
  items = loaders.load_split(name, root, split)[1][:N_ITEMS]
  ps = zero_shot.build_prompts(name, items, root, split)
  results = scorer.loglikelihood([r for p in ps for r in p.requests])
  samples = sorted(harness_out['samples'][task], key=lambda s: s['doc_id'])
  assert [s['doc_id'] for s in samples] == list(range(N_ITEMS))
  pos, accs = 0, []
  for p, s in zip(ps, samples):
    ours = [r.logprob for r in results[pos:pos + len(p.requests)]]
    pos += len(p.requests)
    # The harness built the very same (context, continuation) strings from its templates.
    assert [tuple(a[:2]) for a in s['arguments']] == list(p.requests)
    theirs = [float(r[0][0]) for r in s['resps']]
    # Same requests, but the harness batches them differently, so the scorer packs them at
    # other row offsets and buckets: float32 rounding (about 1e-8 relative) is the only
    # difference, and these sums reach thousands of nats.
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=1e-5)
    accs.append(metrics.choice_metrics(ours, p.choices, p.gold)['acc'])
    assert s['acc'] == accs[-1]
  assert harness_out['results'][task]['acc,none'] == pytest.approx(np.mean(accs), abs=1e-12)
  # Not a degenerate comparison: the choices' scores do differ.
  assert np.std([r.logprob for r in results]) > 0.1


@pytest.mark.slow
def test_rolling_and_generation(setup):
  _, exported, scorer = setup
  lm = harness.StlmLM(exported=exported, scorer=scorer)
  req = lambda *args: types.SimpleNamespace(args=args)  # pylint: disable=unnecessary-lambda-assignment
  text = 'The quick brown fox jumps over the lazy dog. ' * 8
  (rolling,) = lm.loglikelihood_rolling([req(text)])
  ((ll, _),) = lm.loglikelihood([req('', text)])
  assert rolling == ll and rolling < 0
  (out, other, same) = lm.generate_until([
      req('Once upon a time', {'until': ['\n'], 'max_gen_toks': 12}),
      req('The dog', {'max_gen_toks': 5}),
      req('Once upon a time', {'until': ['\n'], 'max_gen_toks': 12})])
  assert isinstance(out, str) and '\n' not in out and out == same
  # max_gen_toks counts tokens, as the harness does: what one request alone gives.
  assert other == generate.generate_text(
      exported, 'The dog', max_bytes=5 * generate.BYTES_PER_UNIT_CAP, max_units=5)


def test_cli_argv_adds_model_tasks_and_data_dir():
  argv = harness.cli_argv(['--model_args', 'checkpoint=x', '--tasks', 'stlm_blimp',
                           '--data_dir=/d', '--metadata', '{"a": 1}'])
  assert argv[:2] == ['--model', 'stlm']
  assert argv[argv.index('--include_path') + 1] == harness.TASKS_DIR
  assert argv[argv.index('--metadata') + 1] == '{"a": 1, "data_dir": "/d"}'


@pytest.mark.slow
def test_old_eot_convention_is_an_option(setup):
  _, _, scorer = setup
  pairs = [('The cat sat on the', ' mat'), ('', 'Colorless green ideas.')]
  new = [r.logprob for r in scorer.loglikelihood(pairs)]
  scorer.always_prefix_eot = True
  try:
    old = [r.logprob for r in scorer.loglikelihood(pairs)]
  finally:
    scorer.always_prefix_eot = False
  assert old[0] != new[0] and old[1] == new[1]  # an empty context had EOT either way


@pytest.mark.slow
def test_requested_split_and_size_weighted_mmlu(setup):
  root, _, scorer = setup
  with pytest.raises(loaders.DataError, match='No arc_easy data'):
    zero_shot.evaluate(scorer, 'arc_easy:test', root, limit=4)
  res = zero_shot.evaluate(scorer, 'arc_easy:test', root, limit=4, allow_split_fallback=True)
  assert res['split'] == 'dev' and res['requested_split'] == 'test'
  assert res['always_prefix_eot'] is False
  mmlu = zero_shot.evaluate(scorer, 'mmlu', root, limit=12)
  assert mmlu['main'] == 'acc' and 'acc_macro' in mmlu
  table = zero_shot.markdown_table('m', 10, dict(arc_easy=res, mmlu=mmlu)).splitlines()
  assert [c.strip() for c in table[3].strip('|').split('|')] == [
      'split', '', '-', '-', 'dev', '-', 'dev', '-']
