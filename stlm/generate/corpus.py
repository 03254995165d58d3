"""Sequence-level distillation: a corpus sampled from a teacher export, for any student.

  python -m stlm.generate.corpus --checkpoint=runs/teacher/export --out=runs/teacher_corpus \
      --documents=2000 --max_tokens=128 --temperature=1.0 --seed=0

Each document is sampled from end-of-text until the model writes end-of-text again or
`--max_tokens` tokens (at most the model's context). A model with a token output layer and a
KV cache (`logits_and_layers`) samples `--batch` documents at a time; any other kind that
generates (byte-pool) samples one document at a time with its own strategy. Document i
draws from the random stream fold_in(seed, i): the same settings give the same corpus.

The output is the local corpus layout: `<out>/samples.jsonl` (one {"text": ...} a line),
which `--config.data.source=local --config.data.path=<out>` trains on (any kind, byte-pool
included), and `<out>/sampling.json`: the teacher, every sampling setting and the counts.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from stlm import cli_errors
from stlm.models import decoding

SAMPLES_FILE = 'samples.jsonl'
SETTINGS_FILE = 'sampling.json'


def _batched_sampler(model, batch: int, sampling: dict):
  """fn(params, rngs [batch]) -> token ids [batch, steps]: cached decoding from end-of-text."""
  method = 'logits_and_layers'

  def init_cache():
    units = jnp.zeros((batch, 1), jnp.int32)
    ones = jnp.ones((batch, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), units, ones, ones * 0,
                                               deterministic=True, decode=True,
                                               method=method)['cache'])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  @jax.jit
  def step(params, cache, units_Bx1, pos_Bx1):
    (logits, _), mutated = model.apply({'params': params, 'cache': cache}, units_Bx1,
                                       jnp.ones_like(units_Bx1), pos_Bx1, deterministic=True,
                                       decode=True, method=method, mutable=['cache'])
    return logits[:, -1], mutated['cache']

  pick = jax.jit(jax.vmap(lambda rng, logits: decoding.sample_logits(rng, logits, **sampling)))

  def run(params, eot_id: int, rngs, steps: int):
    cache, units = init_cache(), np.full((batch, 1), eot_id, np.int32)
    out = []
    for t in range(steps):
      logits_BxV, cache = step(params, cache, units, np.full((batch, 1), t, np.int32))
      units = np.asarray(pick(jax.vmap(lambda r, t=t: jax.random.fold_in(r, t))(rngs),
                              logits_BxV))[:, None]
      out.append(units[:, 0])
      if (np.stack(out, 1) == eot_id).any(axis=1).all():
        break
    return np.stack(out, 1)

  return run


def sample_documents(exported, documents: int, *, max_tokens: int, batch: int = 32,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0) -> list[str]:
  """`documents` texts sampled from the export (see the module docstring)."""
  sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  tok, cfg = exported.tokenizer, exported.config
  steps = min(int(max_tokens), int(cfg.model.max_len) - 1)
  base = jax.random.key(seed)
  texts = []
  if hasattr(exported.model, 'logits_and_layers') and not int(cfg.model.pause_every):
    run = _batched_sampler(exported.model, batch, sampling)
    for start in range(0, documents, batch):
      index = np.minimum(np.arange(start, start + batch), documents - 1)
      rngs = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(index))
      ids_BxS = run(exported.params, tok.eot_id, rngs, steps)
      for row in ids_BxS[:min(batch, documents - start)]:
        ends = np.nonzero(row == tok.eot_id)[0]
        row = row[:ends[0]] if ends.size else row
        texts.append(b''.join(tok.token_bytes(int(t)) for t in row)
                     .decode('utf-8', errors='replace'))
    return texts
  from stlm import generate  # pylint: disable=g-import-not-at-top
  strategy_bytes = 4 * steps   # a byte-level budget of about max_tokens BPE tokens
  for i in range(documents):
    out = generate.generate(exported.model, exported.params, cfg, tok, b'',
                            max_bytes=strategy_bytes, seed=int(jax.random.randint(
                                jax.random.fold_in(base, i), (), 0, 2**31 - 1)), **sampling)
    texts.append(out.decode('utf-8', errors='replace'))
  return texts


def write_corpus(out_dir: str, texts: list[str], settings: dict) -> dict:
  """samples.jsonl + sampling.json, appearing whole or not at all; returns the settings
  written (with the counts)."""
  kept = [t for t in texts if t.strip()]
  record = dict(settings, documents_sampled=len(texts), documents_written=len(kept),
                bytes=sum(len(t.encode('utf-8')) for t in kept))
  with cli_errors.staged_dir(out_dir) as staging:
    with open(os.path.join(staging, SAMPLES_FILE), 'w', encoding='utf-8') as f:
      f.writelines(json.dumps({'text': t}, ensure_ascii=False) + '\n' for t in kept)
    with open(os.path.join(staging, SETTINGS_FILE), 'w', encoding='utf-8') as f:
      json.dump(record, f, indent=2)
  return record


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from stlm import export  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)   # Orbax logs every restored file at INFO
  f = _FLAGS
  if f['documents'].value < 1 or f['max_tokens'].value < 1 or f['batch'].value < 1:
    raise cli_errors.FlagError('need --documents, --max_tokens and --batch >= 1 (got '
                               f'{f["documents"].value}, {f["max_tokens"].value}, '
                               f'{f["batch"].value})')
  t, k, p = f['temperature'].value, f['top_k'].value, f['top_p'].value
  if not 0.0 < p <= 1.0 or k < 0 or t < 0:
    raise cli_errors.FlagError(f'need --temperature >= 0, --top_k >= 0 and 0 < --top_p <= 1 '
                               f'(got {t}, {k}, {p})')
  out = f['out'].value
  cli_errors.check_output_dir('--out', out)
  if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(
      os.path.join(out, SETTINGS_FILE)):
    raise cli_errors.FlagError(f'--out={out} holds files this command did not write; '
                               'give a new or empty directory')
  ckpt = f['checkpoint'].value
  export.check_export(ckpt, '--checkpoint')
  exported = export.load_export(ckpt, '--checkpoint')
  settings = dict(teacher=os.path.abspath(ckpt), documents=f['documents'].value,
                  max_tokens=f['max_tokens'].value, batch=f['batch'].value, temperature=t,
                  top_k=k, top_p=p, seed=f['seed'].value)
  texts = sample_documents(exported, f['documents'].value, max_tokens=f['max_tokens'].value,
                           batch=f['batch'].value, temperature=t, top_k=k, top_p=p,
                           seed=f['seed'].value)
  record = write_corpus(out, texts, settings)
  print(f'wrote {record["documents_written"]} documents ({record["bytes"]:,} bytes) to '
        f'{os.path.join(out, SAMPLES_FILE)}; settings in {os.path.join(out, SETTINGS_FILE)}')


_FLAGS = {}

if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top
  _FLAGS.update(
      checkpoint=flags.DEFINE_string('checkpoint', None, 'the teacher: <workdir>/export.'),
      out=flags.DEFINE_string('out', None, 'the corpus directory to write.'),
      documents=flags.DEFINE_integer('documents', 1000, 'documents to sample.'),
      max_tokens=flags.DEFINE_integer('max_tokens', 128, 'tokens per document at most.'),
      batch=flags.DEFINE_integer('batch', 32, 'documents sampled at once (token models).'),
      temperature=flags.DEFINE_float('temperature', 1.0, 'sampling temperature; 0 = greedy.'),
      top_k=flags.DEFINE_integer('top_k', 0, 'keep the k most likely tokens (0 = all).'),
      top_p=flags.DEFINE_float('top_p', 1.0, 'nucleus sampling mass (1 = off).'),
      seed=flags.DEFINE_integer('seed', 0, 'sampling seed.'))
  flags.mark_flags_as_required(['checkpoint', 'out'])
  cli_errors.run(main)
