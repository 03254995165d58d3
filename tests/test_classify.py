"""Tests for stlm/classify: learning a synthetic task, chance on shuffled labels, committees,
FewRel episodes and prototypes, pooling, token and word overlap, compiled-step reuse."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from configs import encoder as encoder_config
from stlm import tokenizers
from stlm.classify import backbone as backbone_lib
from stlm.classify import committee
from stlm.classify import fewrel
from stlm.classify import finetune
from stlm.classify import overlap
from stlm.data import classification as cd

LETTERS = ('abc', 'def', 'ghi', 'jkl')   # class c writes words from its own letters


def _texts(n, seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n)
  texts = [''.join(rng.choice(list(LETTERS[c]), 10)) for c in labels]
  return texts, labels


@functools.lru_cache(maxsize=None)
def _backbone():
  c = encoder_config.get_config('tiny')
  c.model.update(num_layers=1, hidden_dim=32, num_heads=4, num_kv_heads=4, ffn_dim=64,
                 max_len=16)
  c.tokenizer.kind = 'bytes'
  return backbone_lib.scratch_backbone(c, seed=0)


@pytest.mark.slow
def test_causal_backbone_pools_its_last_position():
  from configs import baseline as baseline_config  # pylint: disable=g-import-not-at-top
  c = baseline_config.get_config('tiny')
  c.model.update(num_layers=1, hidden_dim=32, num_heads=4, num_kv_heads=2, ffn_dim=64,
                 max_len=16)
  c.tokenizer.kind = 'bytes'
  bb = backbone_lib.scratch_backbone(c)
  assert bb.pooling('first') == 'last' and _backbone().pooling('first') == 'first'
  arrays = backbone_lib.tokenize(bb.tokenizer, ['abcd', 'ab'], bb.max_len)
  z = np.asarray(backbone_lib.pooled_fn(bb, 'mean')(bb.params, arrays))
  h = np.asarray(backbone_lib.hidden_fn(bb)(bb.params, arrays))
  np.testing.assert_allclose(z, np.stack([h[0, 4], h[1, 2]]), rtol=1e-6)


def _fit(labels_shuffled: bool):
  bb = _backbone()
  tr_t, tr_y = _texts(256, 0)
  va_t, va_y = _texts(64, 1)
  te_t, te_y = _texts(200, 2)
  if labels_shuffled:
    tr_y = np.random.default_rng(3).permutation(tr_y)
    va_y = np.random.default_rng(4).permutation(va_y)
  tok = lambda t: backbone_lib.tokenize(bb.tokenizer, t, bb.max_len)
  s = finetune.TrainSettings(lr=3e-3, batch_size=32, max_steps=90, eval_every=30, patience=2)
  clf = finetune.train_classifier(bb, tok(tr_t), tr_y, tok(va_t), va_y, 4, s, log=lambda m: 0)
  probs = clf.predict_proba(tok(te_t))
  return finetune.accuracy_with_se(probs.argmax(1), te_y)


@pytest.mark.slow
def test_learns_a_synthetic_task():
  acc, se = _fit(labels_shuffled=False)
  assert acc >= 0.97, (acc, se)


@pytest.mark.slow
def test_shuffled_labels_stay_at_chance():
  acc, _ = _fit(labels_shuffled=True)
  assert acc < 0.4   # chance is 0.25; n = 200 gives SE ~ 0.03


def test_accuracy_standard_error():
  acc, se = finetune.accuracy_with_se(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
  assert acc == 0.75 and se == pytest.approx(np.sqrt(0.75 * 0.25 / 4))


def test_committee_is_the_mean_of_members():
  rng = np.random.default_rng(0)
  members = [rng.dirichlet(np.ones(5), size=7) for _ in range(3)]
  np.testing.assert_allclose(committee.average_probabilities(members),
                             (members[0] + members[1] + members[2]) / 3)
  with pytest.raises(ValueError, match='output shape'):
    committee.average_probabilities([members[0], members[1][:3]])


def test_pooling():
  h = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
  seg = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  np.testing.assert_allclose(backbone_lib.pool(h, seg, 'first'), h[:, 0])
  np.testing.assert_allclose(backbone_lib.pool(h, seg, 'last'), np.stack([h[0, 2], h[1, 1]]))
  np.testing.assert_allclose(backbone_lib.pool(h, seg, 'mean'),
                             np.stack([h[0, :3].mean(0), h[1, :2].mean(0)]))


def _relations():
  inst = lambda r, i: cd.RelationInstance(['w'] * 5, [0], [3], r, f'{r}[{i}]')
  return {f'P{r}': [inst(f'P{r}', i) for i in range(12)] for r in range(8)}


def test_fewrel_episodes_deterministic_and_disjoint():
  rel = _relations()
  a = fewrel.sample_episodes(rel, 5, 2, 3, 20, seed=7)
  b = fewrel.sample_episodes(rel, 5, 2, 3, 20, seed=7)
  assert a == b
  assert a != fewrel.sample_episodes(rel, 5, 2, 3, 20, seed=8)
  for ep in a:
    assert len(set(ep.relations)) == 5
    assert len(ep.support) == 10 and len(ep.query) == 15
    assert not set(ep.support) & set(ep.query)          # a query never in its support set
    assert {r for r, _ in ep.support} == set(ep.relations)
  with pytest.raises(ValueError, match='needs 13'):
    fewrel.sample_episodes(rel, 5, 10, 3, 1, seed=0)


def test_prototype_predicts_nearest_mean():
  sz = np.array([[0.0, 0], [0, 2], [10, 10], [10, 12]])
  pred = fewrel.prototype_predict(sz, [0, 0, 1, 1], np.array([[1.0, 1], [9, 9]]), 2)
  np.testing.assert_array_equal(pred, [0, 1])


@pytest.mark.slow
def test_fewrel_encodings_have_two_marker_vectors():
  bb = _backbone()
  rel = _relations()
  z = fewrel.encode_instances(bb, rel['P0'][:3])
  assert z.shape == (3, 2 * bb.hidden_dim)


def test_token_overlap():
  tok = tokenizers.ByteTokenizer()
  r = overlap.token_overlap(tok, ['aab', 'c'], ['abz'])
  assert r['types'] == pytest.approx(2 / 3)          # a, b seen; c not
  assert r['occurrences'] == pytest.approx(3 / 4)    # a, a, b of a, a, b, c


def test_word_overlap_is_lower_cased_and_tokenizer_free():
  r = overlap.word_overlap(['The cat, the DOG.', 'a_cat 42'], ['the Cat sat', 'no 42'])
  # task words: the x2, cat x2, dog, a, 42 (underscore splits); seen: the, cat, 42
  assert r['types'] == pytest.approx(3 / 5)
  assert r['occurrences'] == pytest.approx(5 / 7)
  assert (r['task_types'], r['corpus_types']) == (5, 5)
  with pytest.raises(ValueError, match='no tokens'):
    overlap.word_overlap(['...'], ['text'])


@pytest.mark.slow
def test_fine_tunes_of_one_architecture_share_compiled_steps():
  """A second backbone of the same shape reuses the jitted step and gives exactly what a
  fresh compilation gives; the cache is keyed so other settings get their own."""
  tr_t, tr_y = _texts(64, 0)
  va_t, va_y = _texts(32, 1)
  s = finetune.TrainSettings(lr=3e-3, max_steps=6, eval_every=3, patience=2)

  def fit(bb, settings=s):
    tok = lambda t: backbone_lib.tokenize(bb.tokenizer, t, bb.max_len)
    return finetune.train_classifier(bb, tok(tr_t), tr_y, tok(va_t), va_y, 4, settings,
                                     log=lambda m: 0)

  other = backbone_lib.scratch_backbone(_backbone().config, seed=1)
  finetune._JITTED.clear()
  fresh = fit(other).params
  cached = len(finetune._JITTED)
  fit(_backbone())
  assert len(finetune._JITTED) == cached
  again = fit(other).params
  for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  fit(other, dataclasses.replace(s, lr=1e-3))
  assert len(finetune._JITTED) == cached + 1     # a new learning rate: a new step


@pytest.mark.slow
def test_candidates_grid_and_selection_on_validation(monkeypatch):
  """Every pooling x lr is tried; the best validation accuracy wins (first on ties), and
  only the chosen classifier is scored on test."""
  from stlm.classify import run  # pylint: disable=g-import-not-at-top
  base = finetune.TrainSettings(lr=1e-3, pool='first')
  assert [(c.pool, c.lr) for c in run.candidates(base)] == [('first', 1e-3)]
  grid = run.candidates(base, ['3e-4', '1e-3'], ['first', 'mean'])
  assert [(c.pool, c.lr) for c in grid] == [('first', 3e-4), ('first', 1e-3),
                                           ('mean', 3e-4), ('mean', 1e-3)]
  probe = run.candidates(finetune.TrainSettings(mode='probe'), ['0.1'])
  assert probe[0].probe_lr == 0.1
  val_acc = {('first', 3e-4): 0.5, ('first', 1e-3): 0.8, ('mean', 3e-4): 0.8,
             ('mean', 1e-3): 0.6}

  class FakeClf:
    def __init__(self, s):
      self.pool, self.lr, self.best_step, self.train_seconds = s.pool, s.lr, 1, 0.0
      self.best_val_accuracy = val_acc[(s.pool, s.lr)]

    def predict_proba(self, arrays):
      n = len(arrays['inputs'])
      right = 1 if (self.pool, self.lr) == ('first', 1e-3) else 0   # only the chosen one
      return np.eye(2)[np.full(n, right)]

  monkeypatch.setattr(finetune, 'train_classifier', lambda bb, *a, log=None: FakeClf(a[-1]))
  texts = [f'text {i}' for i in range(6)]
  ex = cd.Examples(texts, [1] * 6, ('a', 'b'), ['f:1'] * 6)
  sp = run.Splits(ex, ex, ex, {})
  (clf, _, rec, _), = run.fit_members([_backbone()], sp, grid, log=lambda m: 0)
  assert (rec['pool'], rec['lr'], rec['accuracy']) == ('first', 1e-3, 1.0)
  assert [t['best_val_accuracy'] for t in rec['selection']] == [0.5, 0.8, 0.8, 0.6]
  monkeypatch.setattr(run, 'task_splits', lambda *a: sp)
  record = run.text_task([_backbone()], 'agnews', '', None, grid, log=lambda m: 0)
  assert (record['mode'], record['accuracy'], len(record['settings'])) == ('finetune', 1.0, 4)
  assert record['members'][0]['pool'] == 'first'
  # Per-item correctness and the split's digest, for paired comparisons (classify/compare.py).
  from stlm.classify import compare  # pylint: disable=g-import-not-at-top
  assert record['test_correct'] == [1] * 6
  assert record['test_sha256'] == compare.test_split_digest(texts, [1] * 6)


@pytest.mark.slow
def test_scratch_like_an_export_is_its_model_untrained(tmp_path):
  """--checkpoint=scratch:<export>: same shapes and tokenizer as the export, fresh weights."""
  import jax  # pylint: disable=g-import-not-at-top
  from stlm import export as export_lib  # pylint: disable=g-import-not-at-top
  bb = _backbone()
  trained = jax.tree.map(lambda x: np.asarray(x) + 1.0, bb.params)   # stands for pretraining
  export_lib.save_export(str(tmp_path / 'export'), trained, bb.config)
  fresh = backbone_lib.scratch_like(str(tmp_path / 'export'))
  assert fresh.source.startswith('scratch:')
  assert fresh.tokenizer.vocab_size == bb.tokenizer.vocab_size
  for a, b in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(bb.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # the same init, untrained
