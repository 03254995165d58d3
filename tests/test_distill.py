"""Logit distillation: the chunked KL against the plain one, alpha = 0 as ordinary training,
a frozen teacher, a student equal to its teacher at KL 0, and checked settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stlm import config as config_lib
from stlm import export
from stlm.config import validate
from stlm.models import chunked_kl
from stlm.models import factory
from stlm.train import distill
from stlm.train import setup as setup_lib
from stlm.train import sharding

T, B = 16, 2


@pytest.mark.parametrize('top_k', [0, 5])
@pytest.mark.parametrize('n,chunk', [(12, 4), (13, 5)])
def test_chunked_kl_equals_the_plain_kl_in_value_and_gradient(n, chunk, top_k):
  ks = jax.random.split(jax.random.key(0), 5)
  hs, ht = jax.random.normal(ks[0], (n, 8)), jax.random.normal(ks[1], (n, 6))
  ws, wt = jax.random.normal(ks[2], (23, 8)), jax.random.normal(ks[3], (23, 6))
  w = (jax.random.uniform(ks[4], (n,)) > 0.3).astype(jnp.float32)
  plain = lambda hs, ws: chunked_kl.plain_kl(hs @ ws.T, ht @ wt.T, w, 2.0, top_k)
  chunked = lambda hs, ws: chunked_kl.chunked_kl(hs, ws, ht, wt, w, temperature=2.0,
                                                 chunk=chunk, top_k=top_k)
  np.testing.assert_allclose(chunked(hs, ws), plain(hs, ws), rtol=1e-5)
  assert float(plain(hs, ws)) > 0
  for g_c, g_p in zip(jax.grad(chunked, (0, 1))(hs, ws), jax.grad(plain, (0, 1))(hs, ws)):
    np.testing.assert_allclose(g_c, g_p, rtol=1e-4, atol=1e-6)


def _config(**distill_cfg):
  c = config_lib.apply_preset(config_lib.base_config(), 'tiny')
  c.model.update(vocab_size=257, max_len=T, num_layers=1, hidden_dim=32, num_heads=2,
                 num_kv_heads=1, ffn_dim=64, ce_chunk=8)
  c.train.update(batch_size=B, grad_accum=1, steps=10, warmup_steps=1)
  c.tokenizer.kind = 'bytes'
  c.train.distill.update(distill_cfg)
  return c


def _teacher(tmp_path, seed=1, **model):
  c = _config()
  c.model.update(model)
  c.seed = seed
  m = factory.build_model(c.model)
  # The key the trainer initialises a run of this seed with (setup.build_train_step).
  params = factory.init_params(m, c.model, jax.random.split(jax.random.key(seed))[0])
  export.save_export(str(tmp_path / 'teacher'), params, c)
  return str(tmp_path / 'teacher'), params


def _batch(seed):
  ids = np.random.default_rng(seed).integers(1, 257, size=(1, B, T + 1)).astype(np.int32)
  ones = np.ones((1, B, T))
  return dict(inputs=ids[..., :-1], targets=ids[..., 1:], loss_mask=ones.astype(np.float32),
              target_bytes=ones.astype(np.int32), segment_ids=ones.astype(np.int32),
              positions=np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T)).copy())


def _train(config, steps=2):
  mesh = sharding.make_mesh(config.mesh)
  model = factory.build_model(config.model)
  ts = setup_lib.build_train_step(config, model, mesh)
  state, metrics = ts.init(), []
  with sharding.mesh_context(mesh):
    for i in range(steps):
      state, m = ts.step(state, sharding.global_batch(_batch(i), mesh, True))
      metrics.append(jax.device_get(m))
  return ts, state, metrics


def test_alpha_zero_is_ordinary_training_and_the_teacher_stays_frozen(tmp_path):
  path, teacher_params = _teacher(tmp_path, hidden_dim=48, ffn_dim=96)
  _, plain, plain_m = _train(_config())
  ts, distilled, distilled_m = _train(_config(teacher=path, alpha=0.0))
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(distilled.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [m['loss'] for m in plain_m] == [m['loss'] for m in distilled_m]
  assert all(m['distill_kl'] > 0 for m in distilled_m)
  for a, b in zip(jax.tree.leaves(ts.teacher.params), jax.tree.leaves(teacher_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, moved, _ = _train(_config(teacher=path, alpha=0.7))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(moved.params)))


def test_a_student_equal_to_its_teacher_has_kl_zero(tmp_path):
  path, _ = _teacher(tmp_path, seed=0)   # the student's own initial parameters
  c = _config(teacher=path, alpha=1.0)
  c.seed = 0
  mesh = sharding.make_mesh(c.mesh)
  ts = setup_lib.build_train_step(c, factory.build_model(c.model), mesh)
  student = ts.init()
  for a, b in zip(jax.tree.leaves(student.params), jax.tree.leaves(ts.teacher.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with sharding.mesh_context(mesh):
    _, m = ts.step(student, sharding.global_batch(_batch(0), mesh, True))
  assert abs(float(m['distill_kl'])) < 1e-6


@pytest.mark.parametrize('change,match', [
    (dict(alpha=1.5), r'^config\.train\.distill\.alpha=1\.5: must be in \[0, 1\]'),
    (dict(temperature=0.0), r'^config\.train\.distill\.temperature=0\.0: must be > 0'),
    (dict(top_k=-1), r'^config\.train\.distill\.top_k=-1'),
    (dict(required=True), r"^config\.train\.distill\.teacher='': this config distils"),
    (dict(teacher='/nonexistent/export'), r'^config\.train\.distill\.teacher=/nonexistent/export does not exist'),
])
def test_bad_settings_name_the_key(change, match):
  with pytest.raises(validate.ConfigError, match=match):
    distill.check(_config(**change))


def test_a_teacher_with_another_vocabulary_or_kind_is_refused(tmp_path):
  path, _ = _teacher(tmp_path)
  c = _config(teacher=path)
  c.model.vocab_size = 300
  with pytest.raises(validate.ConfigError, match=r"its vocabulary \(257\) is not the student's \(300\)"):
    distill.check(c)
  distill.check(c, vocabulary=False)
  c = _config(teacher=path)
  c.model.kind = 'byte_pool'
  with pytest.raises(validate.ConfigError, match=r"the student \(model\.kind='byte_pool'\) has no token output layer"):
    distill.check(c)


def _exported(tmp_path):
  import types  # pylint: disable=g-import-not-at-top
  from stlm.tokenizers import ByteTokenizer  # pylint: disable=g-import-not-at-top
  c = _config()
  m = factory.build_model(c.model)
  return types.SimpleNamespace(model=m, params=factory.init_params(m, c.model, jax.random.key(3)),
                               config=c, tokenizer=ByteTokenizer())


def test_sequence_level_corpus_is_reproducible_from_its_seed_and_stops_at_eot(tmp_path):
  from stlm.generate import corpus  # pylint: disable=g-import-not-at-top
  ex = _exported(tmp_path)
  kw = dict(max_tokens=12, batch=3, temperature=1.0, top_k=50)
  a = corpus.sample_documents(ex, 5, seed=0, **kw)
  assert len(a) == 5 and a == corpus.sample_documents(ex, 5, seed=0, **kw)
  assert a != corpus.sample_documents(ex, 5, seed=1, **kw)
  # One byte a token here: at most max_tokens bytes, and none past an end-of-text.
  assert all(len(t.encode('utf-8', errors='replace')) <= 3 * 12 for t in a)
  assert len({len(t) for t in a}) > 1   # rows end at their own end-of-text or at the limit
  record = corpus.write_corpus(str(tmp_path / 'c'), a + ['  '], dict(seed=0, **kw))
  lines = (tmp_path / 'c' / corpus.SAMPLES_FILE).read_text(encoding='utf-8').splitlines()
  assert [__import__('json').loads(l)['text'] for l in lines] == [t for t in a if t.strip()]
  assert record['documents_sampled'] == 6 and record['seed'] == 0
