"""The "Tiny language models" study, in one command, with every variable actually varied.

  python -m stlm.experiments.tiny_encoders --data_root=../shared/data --out=runs/encoder_study
  python -m stlm.experiments.tiny_encoders ... --scale=accelerator   # the same, at full size

The design (each knob is a flag; --scale sets all of them, and a flag given wins):
  tokenizer   one sentencepiece model, trained once on equal shares of every corpus below,
              tokenizes every arm (stlm.experiments.encoder_corpora).
  size axis   BERT-1 pretrained on the first --wiki_bytes of English Wikipedia (whole pages;
              the default spans 30x), each at every AG News --finetune_rows.
  overlap     BERT-1 pretrained on --overlap_bytes of each of --corpora (domains from
              encyclopedic prose to children's stories), fine-tuned on --task_rows rows; the
              overlap of each task with each corpus measured per token of the fixed
              tokenizer (the companion paper's definition) and per word.
  seeds       every arm --seeds times; seed s of an arm is compared with seed s of the
              scratch model (the same initialisation, fine-tuning seed and test items), so
              each gap has a seed SE and an item SE (stlm.experiments.encoder_stats).
  tasks       AG News (test: --agnews_test, else carved), DBpedia (its test file), FewRel
              5-way 1-shot prototypes over --episodes fixed episodes.
  committee   --committee_size BERT-1 seeds on the largest Wikipedia subset against one BERT-6
              pretrained for --deep_steps on the same data; BERT-6 must beat BERT-1 first,
              or the comparison says it could not. Latency is measured per example.
Writes <out>/results.json, <out>/table.md (with the three findings) and three plots. Finished
runs (an export, a result file) are reused, so an interrupted study resumes.

On n cores or hosts, n processes share one --out: the same command with --shard=i/n for
i = 0..n-1 (each runs its seeds; the last also the deep model), then once without --shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from absl import app
from absl import flags
from absl import logging

from stlm import cli_errors
from stlm.config import files
from stlm.experiments import encoder_corpora
from stlm.experiments import encoder_design
from stlm.experiments import encoder_report

flags.DEFINE_string('data_root', '../shared/data', 'The shared data directory.')
flags.DEFINE_string('configs_dir', files.DEFAULT_DIR, 'Folder of the config files.')
flags.DEFINE_string('out', 'runs/encoder_study', 'Where subsets, runs, results and plots go.')
flags.DEFINE_enum('scale', 'cpu', list(encoder_design.SCALES),
                  'The study size every unset knob takes.')
flags.DEFINE_string('agnews_test', 'jointmatch_dev_8000.csv', 'AG News test file: a path, '
                    'or a name in the task folder (the default holds 8,000 labelled rows '
                    'outside train_head.csv).')
flags.DEFINE_string('shard', '', 'i/n: this process runs only the seeds s with s % n == i '
                    '(and, when i = n - 1, the deep model), so n processes can share one --out; '
                    'afterwards one run without --shard adds the committee, tables and plots.')
_LIST_KNOBS = {'wiki_bytes': int, 'corpora': str, 'finetune_rows': int, 'lr_grid': float,
               'tasks': str}
_INT_KNOBS = ('vocab_size', 'overlap_bytes', 'seeds', 'pretrain_steps', 'deep_steps',
              'task_rows', 'val_rows', 'max_test', 'finetune_steps', 'episodes',
              'committee_size')
for _k in _LIST_KNOBS:
  flags.DEFINE_list(_k, None, 'Design knob (default: the --scale value).')
for _k in _INT_KNOBS:
  flags.DEFINE_integer(_k, None, 'Design knob (default: the --scale value).')
for _k in ('shallow', 'deep'):
  flags.DEFINE_string(_k, None, 'configs/encoder.py preset (default: the --scale value).')
FLAGS = flags.FLAGS


def design_from_flags() -> encoder_design.Design:
  base = encoder_design.SCALES[FLAGS.scale]()
  given = {}
  for k, cast in _LIST_KNOBS.items():
    if FLAGS[k].value is not None:
      try:
        given[k] = tuple(cast(x) for x in FLAGS[k].value)
      except ValueError:
        raise cli_errors.FlagError(f'--{k}={",".join(FLAGS[k].value)}: not all '
                                   f'{cast.__name__} values') from None
  for k in _INT_KNOBS + ('shallow', 'deep'):
    if FLAGS[k].value is not None:
      given[k] = FLAGS[k].value
  return dataclasses.replace(base, **given)


# --- data ----------------------------------------------------------------------------------

def task_dir(task: str) -> str:
  return str(pathlib.Path(FLAGS.data_root) / encoder_design.TASK_DIRS[task])


def subset_dir(out: pathlib.Path, corpus: str, n_bytes: int) -> pathlib.Path:
  return out / 'corpora' / f'{corpus}-{n_bytes}'


def prepare_data(d: encoder_design.Design, out: pathlib.Path) -> tuple[dict, str]:
  """Writes every subset and trains the fixed tokenizer; (manifests by arm, tokenizer path)."""
  manifests = {arm: encoder_corpora.write_subset(arm[0], FLAGS.data_root, arm[1],
                                                 subset_dir(out, *arm))
               for arm in encoder_design.arms(d)}
  shares = [subset_dir(out, c, d.overlap_bytes) for c in d.corpora]
  tok = encoder_corpora.fixed_tokenizer(shares, d.vocab_size, out / 'tokenizer' /
                                        f'sp{d.vocab_size}.model')
  return manifests, tok


# --- models --------------------------------------------------------------------------------

def pretrain_config(d: encoder_design.Design, preset: str, arm, seed: int, steps: int,
                    tok: str, out):
  c = files.load(os.path.join(FLAGS.configs_dir, 'encoder.py'), preset)
  c.seed = seed
  c.data.source = 'local'
  c.data.path = str(subset_dir(out, *arm))
  c.data.max_train_docs = 0
  c.tokenizer.sp_model_path = tok
  c.tokenizer.sp_vocab_size = d.vocab_size
  c.train.steps = steps
  c.train.warmup_steps = max(1, steps // 10)
  c.train.lr = 3e-3
  c.train.eval_every = max(1, steps // 4)   # four points of the masked-LM curve
  c.train.ckpt_every = steps
  return c


def pretrain(d: encoder_design.Design, preset: str, arm, seed: int, steps: int, tok: str,
             out) -> str:
  from stlm.train import loop  # pylint: disable=g-import-not-at-top
  workdir = out / 'runs' / f'{preset}-{arm[0]}-{arm[1]}-s{seed}'
  if not (workdir / 'export' / 'config.json').is_file():
    print(f'pretraining {workdir.name} ({steps} steps)', flush=True)
    loop.train(pretrain_config(d, preset, arm, seed, steps, tok, out), str(workdir))
  return str(workdir / 'export')


def validation_curve(export: str) -> list[dict]:
  """(step, masked-LM loss, masked accuracy) of every validation row of the export's run."""
  rows = []
  with open(pathlib.Path(export).parent / 'metrics.jsonl', encoding='utf-8') as f:
    for line in f:
      r = json.loads(line)
      if r.get('split') == 'validation':
        rows.append({'step': r['step'], 'loss': r.get('loss'), 'accuracy': r.get('accuracy')})
  return rows


# --- fine-tuning ---------------------------------------------------------------------------

def _split(d: encoder_design.Design, task: str, rows: int):
  from stlm.classify import run  # pylint: disable=g-import-not-at-top
  test_file = agnews_test_path() if task == 'agnews' else ''
  return run.SplitSettings(test_file=test_file, val_size=d.val_rows, max_train=rows,
                           max_test=d.max_test, carve_test=2000, seed=0)


def agnews_test_path() -> str:
  """--agnews_test as a path: itself when it exists, else a name in the AG News folder."""
  path = pathlib.Path(FLAGS.agnews_test)
  if not path.is_file():
    path = pathlib.Path(FLAGS.data_root) / encoder_design.TASK_DIRS['agnews'] / FLAGS.agnews_test
  if not path.is_file():
    raise cli_errors.FlagError(f'--agnews_test={FLAGS.agnews_test}: no such file, neither as '
                               f'a path nor in {path.parent} (name its test split, e.g. '
                               'test.csv)')
  return str(path)


def classify(d: encoder_design.Design, bb, task: str, rows: int, seed: int) -> dict:
  """One fine-tune (or FewRel evaluation); the record with per-item scores in 'scores'."""
  from stlm.classify import finetune  # pylint: disable=g-import-not-at-top
  from stlm.classify import run  # pylint: disable=g-import-not-at-top
  data_dir = task_dir(task)
  if task == 'fewrel':
    rec = run.fewrel_task(bb, data_dir, settings=('5w1s',), n_episodes=d.episodes, seed=0)
    rec['scores'] = rec['settings'][0]['episode_accuracy']
    return rec
  grid = run.candidates(finetune.TrainSettings(pool='mean', max_steps=d.finetune_steps,
                                               eval_every=max(1, d.finetune_steps // 6),
                                               patience=3, seed=seed),
                        [str(x) for x in d.lr_grid])
  rec = run.text_task([bb], task, data_dir, _split(d, task, rows), grid)
  rec['scores'] = rec['test_correct']
  return rec


def _cached(path: pathlib.Path, fn) -> dict:
  if path.is_file():
    return json.loads(path.read_text())
  rec = fn()
  path.parent.mkdir(parents=True, exist_ok=True)
  encoder_corpora.write_atomically(path, json.dumps(rec).encode('utf-8'))
  return rec


def parse_shard(value: str) -> tuple[int, int] | None:
  if not value:
    return None
  try:
    i, n = (int(x) for x in value.split('/'))
  except ValueError:
    raise cli_errors.FlagError(f'--shard={value}: expected i/n, e.g. 0/2') from None
  if not 0 <= i < n:
    raise cli_errors.FlagError(f'--shard={value}: needs 0 <= i < n')
  return i, n


def mine(seed: int, shard) -> bool:
  return shard is None or seed % shard[1] == shard[0]


def gap_study(d: encoder_design.Design, out: pathlib.Path, tok: str, shard=None) -> dict:
  """Every pretrained and scratch fine-tune of the seeds this process runs."""
  from stlm.classify import backbone  # pylint: disable=g-import-not-at-top
  results = {}    # (arm or 'scratch', seed, task, rows) -> record
  for seed in [s for s in range(d.seeds) if mine(s, shard)]:
    scratch = None
    for arm in encoder_design.arms(d):
      todo = [(t, r) for a, t, r in encoder_design.cells(d) if a == arm]
      pre = backbone.load_backbone(pretrain(d, d.shallow, arm, seed, d.pretrain_steps, tok,
                                            out))
      if scratch is None:
        scratch = backbone.scratch_backbone(pre.config, seed)
      for task, rows in todo:
        for name, bb in ((f'{arm[0]}-{arm[1]}', pre), ('scratch', scratch)):
          key = (name if name == 'scratch' else arm, seed, task, rows)
          results[key] = _cached(out / 'finetune' / f'{name}-s{seed}-{task}-r{rows}.json',
                                 lambda bb=bb, task=task, rows=rows: classify(d, bb, task,
                                                                              rows, seed))
  return results


def measure_overlaps(d: encoder_design.Design, out: pathlib.Path, tok: str) -> dict:
  """{(arm, task): token- and word-overlap fractions} of every arm with every task."""
  from stlm import tokenizers  # pylint: disable=g-import-not-at-top
  from stlm.classify import overlap  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.build_tokenizer(ml_collections.ConfigDict(
      {'kind': 'sentencepiece', 'sp_model_path': tok, 'sp_vocab_size': d.vocab_size}))
  task_texts = {t: overlap.task_texts(t, task_dir(t)) for t in d.tasks}
  res = {}
  for arm in encoder_design.arms(d):
    corpus = encoder_corpora.subset_texts(subset_dir(out, *arm))
    for t in d.tasks:
      def measure(t=t, corpus=corpus):
        tk = overlap.token_overlap(tokenizer, task_texts[t], corpus)
        wd = overlap.word_overlap(task_texts[t], corpus)
        return {'token_types': tk['types'], 'token_occurrences': tk['occurrences'],
                'word_types': wd['types'], 'word_occurrences': wd['occurrences']}
      res[(arm, t)] = _cached(out / 'overlap' / f'{arm[0]}-{arm[1]}-{t}.json', measure)
  return res


# --- committee -----------------------------------------------------------------------------

def committee_arm(d: encoder_design.Design) -> tuple[str, int]:
  return ('wikipedia', max(d.wiki_bytes))


def pretrain_committee_models(d: encoder_design.Design, out: pathlib.Path, tok: str,
                              shard) -> None:
  """This shard's part of the committee's pretraining: its member seeds, and the deep model
  in the last shard."""
  for s in range(d.committee_size):
    if mine(s, shard):
      pretrain(d, d.shallow, committee_arm(d), s, d.pretrain_steps, tok, out)
  if d.committee_size and shard[0] == shard[1] - 1:
    pretrain(d, d.deep, committee_arm(d), 0, d.deep_steps, tok, out)


def committee_study(d: encoder_design.Design, out: pathlib.Path, tok: str) -> dict | None:
  from stlm.classify import backbone  # pylint: disable=g-import-not-at-top
  from stlm.classify import compare  # pylint: disable=g-import-not-at-top
  from stlm.classify import run  # pylint: disable=g-import-not-at-top
  if d.committee_size == 0:
    return None
  path = out / 'committee.json'
  if path.is_file():
    return json.loads(path.read_text())
  arm = committee_arm(d)
  members = [backbone.load_backbone(pretrain(d, d.shallow, arm, s, d.pretrain_steps, tok, out))
             for s in range(d.committee_size)]
  deep_export = pretrain(d, d.deep, arm, 0, d.deep_steps, tok, out)
  deep = backbone.load_backbone(deep_export)
  task = 'agnews'
  sp = run.task_splits(task, task_dir(task),
                       _split(d, task, d.task_rows))
  from stlm.classify import finetune  # pylint: disable=g-import-not-at-top
  grid = run.candidates(finetune.TrainSettings(pool='mean', max_steps=d.finetune_steps,
                                               eval_every=max(1, d.finetune_steps // 6),
                                               patience=3, seed=0),
                        [str(x) for x in d.lr_grid])
  fitted = run.fit_members(members, sp, grid, print)
  curve = run.committee_curve(fitted, sp.test.labels)
  ref = run.fit_members([deep], sp, grid, print)
  labels = sp.test.labels
  correct = lambda probs: compare.correctness(probs.argmax(1), labels)   # noqa: E731
  from stlm.classify import committee as committee_lib  # pylint: disable=g-import-not-at-top
  committee_correct = correct(committee_lib.average_probabilities([p for _, p, *_ in fitted]))
  deep_correct = correct(ref[0][1])
  rec = {'task': task, 'corpus': arm[0], 'bytes': arm[1], 'rows': d.task_rows,
         'curve': curve, 'members': [r for _, _, r, _ in fitted],
         'deep': dict(ref[0][2], latency_s_per_example=run.latency(ref),
                      steps=d.deep_steps, validation=validation_curve(deep_export)),
         'shallow_validation': validation_curve(str(members[0].source)),
         'deep_vs_member0': dict(zip(('gap', 'se'), compare.paired_gap(
             deep_correct, correct(fitted[0][1])))),
         'committee_vs_deep': dict(zip(('gap', 'se'), compare.paired_gap(
             committee_correct, deep_correct)))}
  path.write_text(json.dumps(rec, indent=2))
  return rec


# --- findings and outputs ------------------------------------------------------------------

def check_inputs(d: encoder_design.Design) -> None:
  """Everything that can be checked before the first subset is cut."""
  root = pathlib.Path(FLAGS.data_root)
  if not root.is_dir():
    raise cli_errors.FlagError(f'--data_root={root} does not exist')
  encoder_corpora.check_corpora(d.corpora, str(root))
  for task in d.tasks:
    if not (root / encoder_design.TASK_DIRS[task]).is_dir():
      raise cli_errors.FlagError(f'--data_root={root} lacks {encoder_design.TASK_DIRS[task]}/')
  agnews_test_path()
  for preset in (d.shallow, d.deep):   # loading raises, naming the preset, when it is unknown
    files.load(os.path.join(FLAGS.configs_dir, 'encoder.py'), preset)
  cli_errors.check_output_dir('--out', FLAGS.out)


def claim_out(d: encoder_design.Design, out: pathlib.Path) -> None:
  """Records the design in <out>/design.json; refuses an --out made for another design, whose
  cached subsets, runs and fine-tunes would otherwise be mixed into this study's tables."""
  mine = {'design': json.loads(json.dumps(dataclasses.asdict(d))),
          'agnews_test': pathlib.Path(agnews_test_path()).name}
  path = out / 'design.json'
  if path.is_file():
    theirs = json.loads(path.read_text())
    changed = sorted(k for k in set(mine['design']) | set(theirs.get('design', {}))
                     if mine['design'].get(k) != theirs.get('design', {}).get(k))
    if theirs.get('agnews_test') != mine['agnews_test']:
      changed.append('agnews_test')
    if changed:
      raise cli_errors.FlagError(f'--out={out} holds a study of another design (it differs in '
                                 f'{", ".join(changed)}); choose a new --out')
    return
  out.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(mine, indent=2))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  d = design_from_flags()
  parse_shard(FLAGS.shard)
  check_inputs(d)
  out = pathlib.Path(FLAGS.out)
  claim_out(d, out)
  manifests, tok = prepare_data(d, out)
  overlaps = measure_overlaps(d, out, tok)
  shard = parse_shard(FLAGS.shard)
  results = gap_study(d, out, tok, shard)
  if shard is not None:
    pretrain_committee_models(d, out, tok, shard)
    print(f'shard {FLAGS.shard} finished; once every shard has, run the same command without '
          '--shard for the committee, the tables and the plots')
    return
  rows = encoder_design.gap_rows(d, results, manifests, overlaps)
  comm = committee_study(d, out, tok)
  fits = encoder_report.slopes(d, rows)
  found = encoder_report.findings(d, rows, fits, comm)
  (out / 'table.md').write_text(encoder_report.table(d, rows, fits, comm, found))
  (out / 'results.json').write_text(json.dumps(
      {'design': dataclasses.asdict(d), 'gap': rows, 'committee': comm, 'findings': found,
       'slopes': [{'task': t, 'against': x, **s} for (t, x), s in sorted(fits.items())]},
      indent=2))
  encoder_report.plots(d, rows, comm, out)
  print((out / 'table.md').read_text())


if __name__ == '__main__':
  cli_errors.run(main)
