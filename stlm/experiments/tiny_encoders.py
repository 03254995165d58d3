"""The "Tiny language models" grid at CPU scale, end to end, in one command.

  python -m stlm.experiments.tiny_encoders --data_root=../shared/data --out=runs/tiny_encoders

1. Pretrains BERT-1 (configs/encoder.py:bert1_mini) with masked-LM on the first N pages of
   the shared English Wikipedia shards, for each N in --subset_docs.
2. For each subset and task: fine-tunes the pretrained model and the same model from scratch
   (same tokenizer: the subset's), AG News and DBpedia; FewRel 5-way 1-shot prototypes.
   The gap (pretrained - scratch accuracy) and the token overlap of the task with the subset.
3. Committees: BERT-1 pretrained with --committee_size seeds on the largest subset, each
   fine-tuned on AG News; committees of the first 1..K averaged vs one BERT-6
   (bert6_mini), with measured latency per example.
Writes <out>/results.json, <out>/table.md and three PNG plots. Runs that finished already
(an export, a result file) are reused, so an interrupted grid resumes.

Default sizes: subsets
30, 100, 300 pages (150 pretraining steps of 32 x 128 tokens see 30 pages ~10 times, 300 pages
about once); fine-tuning on 1,000 train / 300 validation examples, <= 150 steps, learning
rate 1e-3 or 3e-3 chosen per arm on validation, mean pooling; 1,000 test examples; FewRel
5-way 1-shot, 50 episodes; committees of 1-5 BERT-1 vs one BERT-6 on 300 pages.
The run in results/ cuts this further: --lr_grid=3e-3 --finetune_steps=100
--committee_size=3 --tasks=agnews,fewrel.
"""

from __future__ import annotations

import json
import os
import pathlib

from absl import app
from absl import flags
from absl import logging

from stlm import cli_errors
from stlm.config import files

flags.DEFINE_string('data_root', '../shared/data', 'The shared data directory.')
flags.DEFINE_string('configs_dir', files.DEFAULT_DIR, 'Folder of the config files.')
flags.DEFINE_string('out', 'runs/tiny_encoders', 'Where runs, results, table and plots go.')
flags.DEFINE_list('subset_docs', ['30', '100', '300'], 'Pretraining subset sizes (pages).')
flags.DEFINE_list('tasks', ['agnews', 'dbpedia', 'fewrel'], 'Tasks of the gap study.')
flags.DEFINE_integer('pretrain_steps', 150, 'Masked-LM steps per pretraining run.')
flags.DEFINE_integer('committee_size', 5, 'BERT-1 members (seeds); 0 skips committees.')
flags.DEFINE_string('committee_task', 'agnews', 'Task of the committee study.')
flags.DEFINE_integer('max_train', 1000, 'Fine-tuning train examples.')
flags.DEFINE_integer('val_size', 300, 'Validation examples carved from train.')
flags.DEFINE_integer('max_test', 1000, 'Test examples.')
flags.DEFINE_integer('finetune_steps', 150, 'Maximum fine-tuning steps.')
flags.DEFINE_list('lr_grid', ['1e-3', '3e-3'], 'Fine-tuning learning rates; each arm '
                  '(pretrained, scratch, each committee member, BERT-6) takes the one with the '
                  'best validation accuracy.')
flags.DEFINE_list('pool_grid', ['mean'], 'Poolings chosen among on validation the same way.')
flags.DEFINE_integer('episodes', 50, 'FewRel episodes (5-way 1-shot).')
FLAGS = flags.FLAGS

BERT1, BERT6 = 'bert1_mini', 'bert6_mini'   # presets of configs/encoder.py
TASK_DIRS = {'agnews': 'classification/agnews', 'dbpedia': 'classification/dbpedia',
             'fewrel': 'classification/fewrel'}


def _config(preset: str, n_docs: int, seed: int, steps: int):
  c = files.load(os.path.join(FLAGS.configs_dir, 'encoder.py'), preset)
  c.seed = seed
  c.data.source = 'local'
  c.data.path = str(pathlib.Path(FLAGS.data_root) / 'corpus' / 'wikipedia_en')
  c.data.max_train_docs = n_docs
  c.train.steps = steps
  c.train.warmup_steps = max(1, steps // 10)
  c.train.lr = 3e-3
  c.train.eval_every = steps
  c.train.ckpt_every = steps
  return c


def pretrain(spec: str, n_docs: int, seed: int, name: str) -> str:
  from stlm.train import loop  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(FLAGS.out) / name
  export = workdir / 'export'
  if not (export / 'config.json').is_file():
    print(f'pretraining {name} (encoder.py:{spec}, {n_docs} pages, seed {seed})', flush=True)
    loop.train(_config(spec, n_docs, seed, FLAGS.pretrain_steps), str(workdir))
  return str(export)


def _cached(path: pathlib.Path, fn):
  if path.is_file():
    return json.loads(path.read_text())
  rec = fn()
  path.write_text(json.dumps(rec, indent=2))
  return rec


def _split():
  from stlm.classify import run  # pylint: disable=g-import-not-at-top
  return run.SplitSettings(val_size=FLAGS.val_size, max_train=FLAGS.max_train,
                           max_test=FLAGS.max_test, carve_test=FLAGS.max_test)


def _train():
  """The candidate fine-tuning settings; every arm picks its own on validation."""
  from stlm.classify import finetune  # pylint: disable=g-import-not-at-top
  from stlm.classify import run  # pylint: disable=g-import-not-at-top
  return run.candidates(finetune.TrainSettings(max_steps=FLAGS.finetune_steps, eval_every=50,
                                               patience=3), FLAGS.lr_grid, FLAGS.pool_grid)


def classify(bb, task: str) -> dict:
  from stlm.classify import run  # pylint: disable=g-import-not-at-top
  data_dir = str(pathlib.Path(FLAGS.data_root) / TASK_DIRS[task])
  if task == 'fewrel':
    return run.fewrel_task(bb, data_dir, settings=('5w1s',), n_episodes=FLAGS.episodes)
  return run.text_task([bb], task, data_dir, _split(), _train())


def task_texts(task: str) -> list[str]:
  from stlm.classify import overlap  # pylint: disable=g-import-not-at-top
  return overlap.task_texts(task, str(pathlib.Path(FLAGS.data_root) / TASK_DIRS[task]))


def gap_study(out: pathlib.Path) -> list[dict]:
  from stlm.classify import backbone  # pylint: disable=g-import-not-at-top
  from stlm.classify import overlap  # pylint: disable=g-import-not-at-top
  rows = []
  for n in [int(x) for x in FLAGS.subset_docs]:
    export = pretrain(BERT1, n, 0, f'bert1_docs{n}_seed0')
    pre = backbone.load_backbone(export)
    scratch_cfg = _config(BERT1, n, 0, FLAGS.pretrain_steps)
    scratch_cfg.tokenizer.sp_model_path = str(pathlib.Path(export) / 'tokenizer.model')
    scratch = backbone.scratch_backbone(scratch_cfg)
    corpus = overlap.pretraining_texts(pre.config)
    for task in FLAGS.tasks:
      r_pre = _cached(out / f'gap_{task}_docs{n}_pretrained.json', lambda: classify(pre, task))
      r_scr = _cached(out / f'gap_{task}_docs{n}_scratch.json',
                      lambda: classify(scratch, task))
      ov = _cached(out / f'overlap_{task}_docs{n}.json',
                   lambda: overlap.token_overlap(pre.tokenizer, task_texts(task), corpus))
      gap = r_pre['accuracy'] - r_scr['accuracy']
      se = (r_pre['stderr'] ** 2 + r_scr['stderr'] ** 2) ** 0.5
      rows.append({'task': task, 'docs': n, 'pretrained': r_pre['accuracy'],
                   'pretrained_se': r_pre['stderr'], 'scratch': r_scr['accuracy'],
                   'scratch_se': r_scr['stderr'], 'gap': gap, 'gap_se': se,
                   'overlap_types': ov['types'], 'overlap_tokens': ov['occurrences'],
                   'n_test': r_pre['n_test'],
                   'pretrained_lr': r_pre.get('members', [{}])[0].get('lr'),
                   'scratch_lr': r_scr.get('members', [{}])[0].get('lr')})
      print(f'{task} docs={n}: pretrained {r_pre["accuracy"]:.4f}, scratch '
            f'{r_scr["accuracy"]:.4f}, gap {gap:+.4f} ± {se:.4f}', flush=True)
  return rows


def committee_study(out: pathlib.Path) -> dict:
  from stlm.classify import backbone  # pylint: disable=g-import-not-at-top
  from stlm.classify import run  # pylint: disable=g-import-not-at-top
  n = max(int(x) for x in FLAGS.subset_docs)
  task = FLAGS.committee_task
  path = out / f'committee_{task}.json'
  if path.is_file():
    return json.loads(path.read_text())
  members = [backbone.load_backbone(pretrain(BERT1, n, s, f'bert1_docs{n}_seed{s}'))
             for s in range(FLAGS.committee_size)]
  deep = backbone.load_backbone(pretrain(BERT6, n, 0, f'bert6_docs{n}_seed0'))
  sp = run.task_splits(task, str(pathlib.Path(FLAGS.data_root) / TASK_DIRS[task]), _split())
  fitted = run.fit_members(members, sp, _train(), print)
  curve = run.committee_curve(fitted, sp.test.labels)
  ref = run.fit_members([deep], sp, _train(), print)
  rec = {'task': task, 'docs': n, 'curve': curve,
         'bert6': dict(ref[0][2], latency_s_per_example=run.latency(ref))}
  path.write_text(json.dumps(rec, indent=2))
  return rec


def write_outputs(out: pathlib.Path, rows: list[dict], comm: dict | None) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  lines = ['| task | pretraining pages | pretrained acc | scratch acc | gap (± SE) | '
           'overlap types | overlap tokens | n_test |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["task"]} | {r["docs"]} | {r["pretrained"]:.4f} ± '
                 f'{r["pretrained_se"]:.4f} | {r["scratch"]:.4f} ± {r["scratch_se"]:.4f} | '
                 f'{r["gap"]:+.4f} ± {r["gap_se"]:.4f} | {r["overlap_types"]:.3f} | '
                 f'{r["overlap_tokens"]:.3f} | {r["n_test"]} |')
  if comm:
    lines += ['', f'Committees on {comm["task"]} (BERT-1 members, pretrained on '
              f'{comm["docs"]} pages, different seeds):', '',
              '| model | accuracy | latency ms/example |', '|---|---|---|']
    for c in comm['curve']:
      lines.append(f'| committee of {c["members"]} BERT-1 | {c["accuracy"]:.4f} ± '
                   f'{c["stderr"]:.4f} | {c["latency_s_per_example"] * 1e3:.3f} |')
    b = comm['bert6']
    lines.append(f'| one BERT-6 | {b["accuracy"]:.4f} ± {b["stderr"]:.4f} | '
                 f'{b["latency_s_per_example"] * 1e3:.3f} |')
  (out / 'table.md').write_text('\n'.join(lines) + '\n')
  (out / 'results.json').write_text(json.dumps({'gap': rows, 'committee': comm}, indent=2))

  tasks = sorted({r['task'] for r in rows})
  for key, xlabel, fname, logx in (('docs', 'pretraining subset (Wikipedia pages)',
                                    'gap_vs_subset.png', True),
                                   ('overlap_types', 'token-type overlap with pretraining',
                                    'gap_vs_overlap.png', False)):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for t in tasks:
      rs = sorted((r for r in rows if r['task'] == t), key=lambda r: r[key])
      ax.errorbar([r[key] for r in rs], [r['gap'] for r in rs],
                  yerr=[r['gap_se'] for r in rs], marker='o', capsize=3, label=t)
    ax.axhline(0, color='grey', lw=0.8)
    if logx:
      ax.set_xscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel('accuracy gap (pretrained - scratch)')
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / fname, dpi=120)
    plt.close(fig)
  if comm:
    fig, ax1 = plt.subplots(figsize=(5, 3.5))
    ks = [c['members'] for c in comm['curve']]
    ax1.errorbar(ks, [c['accuracy'] for c in comm['curve']],
                 yerr=[c['stderr'] for c in comm['curve']], marker='o', capsize=3,
                 label='BERT-1 committee accuracy')
    ax1.axhline(comm['bert6']['accuracy'], color='C1', ls='--', label='BERT-6 accuracy')
    ax1.set_xlabel('committee size (BERT-1 members)')
    ax1.set_ylabel('accuracy')
    ax2 = ax1.twinx()
    ax2.plot(ks, [c['latency_s_per_example'] * 1e3 for c in comm['curve']], 's:', color='C2',
             label='committee latency')
    ax2.axhline(comm['bert6']['latency_s_per_example'] * 1e3, color='C3', ls=':',
                label='BERT-6 latency')
    ax2.set_ylabel('ms per example')
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=7, loc='lower right')
    fig.tight_layout()
    fig.savefig(out / 'committee.png', dpi=120)
    plt.close(fig)


def check_inputs() -> None:
  """Every flag that can be checked before pretraining starts, so a mistake costs no wait."""
  for task in FLAGS.tasks + ([FLAGS.committee_task] if FLAGS.committee_size > 0 else []):
    if task not in TASK_DIRS:
      flag = '--tasks' if task in FLAGS.tasks else '--committee_task'
      raise cli_errors.FlagError(f'{flag}: unknown task {task!r}; choose from '
                                 f'{", ".join(TASK_DIRS)}')
  bad = [n for n in FLAGS.subset_docs if not n.isdigit() or int(n) < 1]
  if bad or not FLAGS.subset_docs:
    raise cli_errors.FlagError(f'--subset_docs: {", ".join(bad) or "empty"}; give page counts '
                               '>= 1')
  root = pathlib.Path(FLAGS.data_root)
  if not root.is_dir():
    raise cli_errors.FlagError(f'--data_root={root} does not exist')
  needed = [root / 'corpus' / 'wikipedia_en'] + [
      root / TASK_DIRS[t] for t in dict.fromkeys(
          FLAGS.tasks + ([FLAGS.committee_task] if FLAGS.committee_size > 0 else []))]
  for path in needed:
    if not path.is_dir():
      raise cli_errors.FlagError(f'--data_root={root} lacks {path.relative_to(root)}/')
  if not (pathlib.Path(FLAGS.configs_dir) / 'encoder.py').is_file():
    raise cli_errors.FlagError(f'--configs_dir={FLAGS.configs_dir} has no encoder.py')
  cli_errors.check_output_dir('--out', FLAGS.out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  check_inputs()
  out = pathlib.Path(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  rows = gap_study(out)
  comm = committee_study(out) if FLAGS.committee_size > 0 else None
  write_outputs(out, rows, comm)
  print((out / 'table.md').read_text())


if __name__ == '__main__':
  cli_errors.run(main)
