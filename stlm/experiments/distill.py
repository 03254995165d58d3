"""Distillation at the tiny preset: a student 4x smaller in core, with and without a teacher.

  python -m stlm.experiments.distill --data=../shared/data/corpus/wikipedia_en \
      --steps=400 --seed=0 --workdir=runs/distill

Runs, each --steps steps of batch 8 on --data (data.source=local), seed --seed:
- teacher: configs/baseline.py at the tiny preset with a core of hidden 128 (4 heads, 2 KV
  heads, SwiGLU 384): four times the student's core parameters;
- student: the tiny baseline (hidden 64);
- logit: the same student with train.distill from the teacher's export (alpha, temperature
  from --alpha, --temperature);
- sequence: the same student trained on --documents documents sampled from the teacher
  (python -m stlm.generate.corpus, temperature 1, --seed), written to <workdir>/corpus.
Every export scores the same held-out documents (the first --eval_docs of the validation
split of --data, <workdir>/heldout.jsonl). The step-time cost of logit distillation is an
interleaved A/B of the student's plain and distilled train steps in this process
(--timing_rounds rounds on one synthetic batch, median ratio). A finished run is not redone.
"""

import json
import os
import statistics
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import numpy as np

from stlm import cli_errors
from stlm import export as export_lib
from stlm.config import files
from stlm.experiments import heldout
from stlm.generate import corpus
from stlm.models import factory
from stlm.models import kinds
from stlm.train import loop
from stlm.train import setup as setup_lib
from stlm.train import sharding

_DATA = flags.DEFINE_string('data', '../shared/data/corpus/wikipedia_en',
                            '.txt/.jsonl file or folder of documents (data.source=local).')
_STEPS = flags.DEFINE_integer('steps', 400, 'train steps of every run.')
_SEED = flags.DEFINE_integer('seed', 0, 'seed of init, data order and sampling.')
_ALPHA = flags.DEFINE_float('alpha', 0.5, 'train.distill.alpha of the logit student.')
_TEMPERATURE = flags.DEFINE_float('temperature', 2.0, 'train.distill.temperature.')
_DOCUMENTS = flags.DEFINE_integer('documents', 1500, 'documents sampled from the teacher.')
_EVAL_DOCS = flags.DEFINE_integer('eval_docs', 40, 'held-out documents scored per export.')
_ROUNDS = flags.DEFINE_integer('timing_rounds', 20, 'interleaved rounds of the step timing.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/distill', 'runs, corpus and table.md.')

TEACHER_CORE = dict(hidden_dim=128, num_heads=4, num_kv_heads=2, ffn_dim=384)


def _config(data_path: str, **model):
  c = files.load(os.path.join(files.DEFAULT_DIR, 'baseline.py'), 'tiny')
  c.seed = _SEED.value
  c.model.update(model)
  c.data.update(source='local', path=os.path.abspath(data_path), decode_errors='replace',
                val_fraction=0.02)
  steps = _STEPS.value
  c.train.update(steps=steps, warmup_steps=max(steps // 10, 1), log_every=max(steps // 20, 1),
                 eval_every=steps, eval_batches=4, ckpt_every=steps)
  return c


def _train(name: str, config) -> str:
  run_dir = os.path.join(os.path.abspath(_WORKDIR.value), name)
  if not heldout.finished(run_dir):
    start = time.perf_counter()
    loop.train(config, run_dir)
    print(f'{name}: trained in {time.perf_counter() - start:.0f} s', flush=True)
  return os.path.join(run_dir, 'export')


def step_cost(student, distilled) -> dict:
  """Median seconds per step of the plain and the distilled student, interleaved."""
  mesh = sharding.make_mesh(student.mesh)
  rng = np.random.default_rng(0)
  steps, batch = [], None
  for c in (student, distilled):
    c = c.copy_and_resolve_references()
    c.model.vocab_size = 50257
    model = factory.build_model(c.model)
    ts = setup_lib.build_train_step(c, model, mesh)
    batch = batch or kinds.get_kind(c.model.kind).synthetic_batch(
        c.model, rng, (1, c.train.batch_size))
    steps.append([ts, ts.init()])
  times = [[], []]
  with sharding.mesh_context(mesh):
    placed = sharding.global_batch(batch, mesh, True)
    for r in range(_ROUNDS.value + 1):
      for i, entry in enumerate(steps):
        t0 = time.perf_counter()
        entry[1], m = entry[0].step(entry[1], placed)
        jax.block_until_ready(m)
        if r:   # round 0 compiles
          times[i].append(time.perf_counter() - t0)
  plain, dist = (statistics.median(t) for t in times)
  return dict(plain_s=plain, distilled_s=dist, ratio=dist / plain)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)
  if not os.path.exists(_DATA.value):
    raise cli_errors.FlagError(f'--data={_DATA.value} does not exist')
  for flag in (_STEPS, _DOCUMENTS, _EVAL_DOCS, _ROUNDS):
    if flag.value < 1:
      raise cli_errors.FlagError(f'--{flag.name}={flag.value} must be >= 1')
  workdir = os.path.abspath(_WORKDIR.value)
  cli_errors.check_output_dir('--workdir', workdir)
  os.makedirs(workdir, exist_ok=True)
  teacher_cfg, student_cfg = _config(_DATA.value, **TEACHER_CORE), _config(_DATA.value)
  teacher = _train('teacher', teacher_cfg)
  student = _train('student', student_cfg)
  logit_cfg = _config(_DATA.value)
  logit_cfg.train.distill.update(teacher=teacher, alpha=_ALPHA.value,
                                 temperature=_TEMPERATURE.value)
  logit = _train('logit', logit_cfg)
  corpus_dir = os.path.join(workdir, 'corpus')
  if not os.path.isfile(os.path.join(corpus_dir, corpus.SETTINGS_FILE)):
    texts = corpus.sample_documents(export_lib.load_export(teacher), _DOCUMENTS.value,
                                    max_tokens=student_cfg.model.max_len, batch=64,
                                    seed=_SEED.value)
    corpus.write_corpus(corpus_dir, texts, dict(teacher=teacher, documents=_DOCUMENTS.value,
                                                temperature=1.0, top_k=0, top_p=1.0,
                                                seed=_SEED.value))
  sequence = _train('sequence', _config(corpus_dir))
  text_path = os.path.join(workdir, 'heldout.jsonl')
  texts = heldout.write_documents(student_cfg, _EVAL_DOCS.value, text_path)
  rows = []
  for name, export_dir in (('teacher', teacher), ('student', student), ('logit', logit),
                           ('sequence', sequence)):
    result = heldout.score(export_dir, texts, text_path)
    rows.append(dict(run=name, bits_per_byte=result['perplexity']['bits_per_byte'],
                     parameters=result['parameters']))
    print(json.dumps(rows[-1]), flush=True)
  cost = step_cost(student_cfg, logit_cfg)
  lines = [f'{_STEPS.value} steps (tiny preset, batch 8), seed {_SEED.value}, data {_DATA.value}, '
           f'{len(texts)} held-out documents; logit: alpha {_ALPHA.value}, temperature '
           f'{_TEMPERATURE.value}; sequence: {_DOCUMENTS.value} teacher documents', '',
           '| run | parameters | held-out bits/byte | vs student |', '|---|---|---|---|']
  base = next(r['bits_per_byte'] for r in rows if r['run'] == 'student')
  lines += [f'| {r["run"]} | {r["parameters"]:,} | {r["bits_per_byte"]:.4f} | '
            f'{r["bits_per_byte"] - base:+.4f} |' for r in rows]
  lines += ['', f'step time (interleaved, median of {_ROUNDS.value}): plain '
            f'{cost["plain_s"] * 1e3:.1f} ms, distilled {cost["distilled_s"] * 1e3:.1f} ms, '
            f'{cost["ratio"]:.2f}x']
  with cli_errors.atomic_file(os.path.join(workdir, 'table.md')) as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  cli_errors.run(main)
