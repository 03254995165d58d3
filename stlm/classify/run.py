"""One classification experiment: splits, backbone(s), training, test accuracy, JSON record.

Used by the CLI (`python -m stlm.classify`) and by the experiment grid
(stlm.experiments.tiny_encoders).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np

from stlm import cli_errors
from stlm.classify import backbone as backbone_lib
from stlm.classify import committee as committee_lib
from stlm.classify import compare as compare_lib
from stlm.classify import fewrel as fewrel_lib
from stlm.classify import finetune
from stlm.data import classification as cls_data


@dataclasses.dataclass
class SplitSettings:
  train_file: str = ''        # '' = the first documented train file present in data_dir
  test_file: str = ''         # '' = the documented test file; absent: carve from train
  val_size: int = 500         # validation examples carved from train (early stopping)
  max_train: int = 0          # 0 = all remaining train examples
  max_test: int = 0           # 0 = the whole test split
  carve_test: int = 2000      # test examples carved from train when there is no test file
  seed: int = 0


@dataclasses.dataclass
class Splits:
  train: cls_data.Examples
  val: cls_data.Examples
  test: cls_data.Examples
  info: dict


def _norm(text: str) -> str:
  return re.sub(r'[^a-z0-9]+', '', text.lower())


def task_files(task: str, data_dir: str, s: SplitSettings):
  """(train file, test file or None) of a text task; FileNotFoundError naming the flag when a
  file is missing or empty. Reads nothing else, so a command can check before loading models."""
  if task not in cls_data.TRAIN_FILES:
    raise cli_errors.FlagError(f'--task={task!r} has no text-classification files; choose '
                               f'one of {", ".join(cls_data.TRAIN_FILES)}')
  if not s.train_file and data_dir and not pathlib.Path(data_dir).is_dir():
    raise FileNotFoundError(f'--data_dir={data_dir} does not exist')
  train_path = pathlib.Path(s.train_file) if s.train_file else cls_data.find_file(
      task, data_dir, cls_data.TRAIN_FILES[task])
  if train_path is None or not train_path.is_file():
    raise FileNotFoundError(f'--train_file {train_path} does not exist' if s.train_file else
                            f'no {task} train file: give --train_file, or --data_dir holding '
                            f'one of {cls_data.TRAIN_FILES[task]} (got {data_dir!r})')
  test_path = pathlib.Path(s.test_file) if s.test_file else cls_data.find_file(
      task, data_dir, cls_data.TEST_FILES[task])
  if test_path is not None and not test_path.is_file():
    raise FileNotFoundError(f'--test_file {test_path} does not exist')
  for flag, given, path in (('--train_file', s.train_file, train_path),
                            ('--test_file', s.test_file, test_path)):
    if path is not None and path.stat().st_size == 0:
      raise cls_data.DataFormatError(f'{flag if given else "--data_dir"}: {path} is empty')
  return train_path, test_path


def task_splits(task: str, data_dir: str, s: SplitSettings) -> Splits:
  """Train / validation (carved from train) / test of a text task, deterministic by seed."""
  train_path, test_path = task_files(task, data_dir, s)
  full = cls_data.load_task_file(task, train_path)
  rng = np.random.default_rng(s.seed)
  order = rng.permutation(len(full))
  info = {'train_file': str(train_path)}
  if test_path is None:
    test = full.subset(order[:s.carve_test])
    order = order[s.carve_test:]
    info['test_file'] = f'carved from {train_path} ({s.carve_test} rows, seed {s.seed})'
  else:
    test = cls_data.load_task_file(task, test_path)
    info['test_file'] = str(test_path)
    # Texts that also occur in train (e.g. ~150 dhim rows are in keaml) are not a test.
    seen = {_norm(t) for t in full.texts}
    keep = [i for i, t in enumerate(test.texts) if _norm(t) not in seen]
    info['test_dropped_as_in_train'] = len(test) - len(keep)
    test = test.subset(keep)
  if s.max_test and len(test) > s.max_test:
    test = test.subset(np.sort(np.random.default_rng(s.seed + 1).permutation(len(test))
                               [:s.max_test]))
  val = full.subset(order[:s.val_size])
  rest = order[s.val_size:]
  train = full.subset(rest[:s.max_train] if s.max_train else rest)
  if len(train) == 0 or len(val) == 0:
    raise cli_errors.FlagError(f'--val_size={s.val_size}: {train_path} has {len(full)} rows, '
                               'too few to carve validation and train from')
  info.update(n_train=len(train), n_val=len(val), n_test=len(test),
              val='carved from train', seed=s.seed)
  return Splits(train, val, test, info)


def _lr_field(train: finetune.TrainSettings) -> str:
  """The learning rate a setting trains with: a linear probe's probe_lr, else lr."""
  return 'probe_lr' if train.mode == 'probe' else 'lr'


def _as_grid(train) -> list:
  """One TrainSettings or a list of candidates -> the list."""
  return list(train) if isinstance(train, (list, tuple)) else [train]


def candidates(train: finetune.TrainSettings, lrs=(), pools=()) -> list:
  """The settings grid chosen among on validation: every pooling x every learning rate.

  `lrs` are fine-tuning learning rates (a linear probe's probe_lr in probe mode); empty
  lists keep `train`'s own value, so one candidate means no selection.
  """
  field = _lr_field(train)
  try:
    lrs = [float(x) for x in lrs] or [getattr(train, field)]
  except ValueError:
    raise cli_errors.FlagError(f'--lr_grid={",".join(map(str, lrs))}: not all numbers') from None
  pools = list(pools) or [train.pool]
  bad = [p for p in pools if p not in backbone_lib.POOLINGS]
  if bad:
    raise cli_errors.FlagError(f'--pool_grid: {", ".join(bad)}; choose among '
                               f'{", ".join(backbone_lib.POOLINGS)}')
  return [dataclasses.replace(train, pool=p, **{field: lr}) for p in pools for lr in lrs]


def _select(bb, tr, va, sp: Splits, grid, seed: int, log):
  """Fits every candidate; keeps the best by validation accuracy (the first on ties).

  Only the validation split decides: test accuracy is computed for the chosen one alone.
  """
  best, tried = None, []
  for cand in grid:
    if len(grid) > 1:
      log(f'  candidate pool={cand.pool} lr={getattr(cand, _lr_field(cand)):g}')
    clf = finetune.train_classifier(bb, tr, sp.train.labels, va, sp.val.labels,
                                    len(sp.train.classes),
                                    dataclasses.replace(cand, seed=seed), log=log)
    tried.append({'pool': clf.pool, 'lr': cand.lr, 'probe_lr': cand.probe_lr,
                  'best_val_accuracy': clf.best_val_accuracy, 'best_step': clf.best_step})
    if best is None or clf.best_val_accuracy > best[0].best_val_accuracy:
      best = (clf, cand)
  return best[0], best[1], tried


def fit_members(backbones, sp: Splits, train, log):
  """Fine-tunes each backbone on its own; (classifier, test probs, record, test arrays).

  `train` is one TrainSettings or a list of candidates (see `candidates`), chosen among per
  backbone by validation accuracy.
  """
  grid = _as_grid(train)
  out = []
  for i, bb in enumerate(backbones):
    tr = backbone_lib.tokenize(bb.tokenizer, sp.train.texts, bb.max_len)
    va = backbone_lib.tokenize(bb.tokenizer, sp.val.texts, bb.max_len)
    te = backbone_lib.tokenize(bb.tokenizer, sp.test.texts, bb.max_len)
    log(f'{bb.source} ({grid[0].mode}): {len(sp.train)} train / {len(sp.val)} val')
    clf, chosen, tried = _select(bb, tr, va, sp, grid, grid[0].seed + i, log)
    lr = getattr(chosen, _lr_field(chosen))   # the one that was chosen
    probs = clf.predict_proba(te)
    acc, se = finetune.accuracy_with_se(probs.argmax(1), sp.test.labels)
    if len(grid) > 1:
      log(f'  chosen on validation: pool={chosen.pool} lr={lr:g} '
          f'(validation accuracy {clf.best_val_accuracy:.4f})')
    log(f'  test accuracy {acc:.4f} ± {se:.4f} (n={len(sp.test)})')
    rec = {'checkpoint': bb.source, 'accuracy': acc, 'stderr': se,
           'best_step': clf.best_step, 'val_accuracy': clf.best_val_accuracy,
           'pool': clf.pool, 'lr': lr, 'train_seconds': round(clf.train_seconds, 1)}
    if len(grid) > 1:
      rec['selection'] = tried
    out.append((clf, probs, rec, te))
  return out


LATENCY_EXAMPLES = 256   # test examples each latency measurement runs over


def latency(fitted) -> float:
  arrays = {k: v[:LATENCY_EXAMPLES] for k, v in fitted[0][3].items()}
  return committee_lib.latency_per_example([c for c, *_ in fitted], arrays)


def committee_curve(fitted, labels) -> list[dict]:
  """Accuracy and latency of the committees of the first 1, 2, ... fitted members."""
  rows = []
  for k in range(1, len(fitted) + 1):
    probs = committee_lib.average_probabilities([p for _, p, *_ in fitted[:k]])
    acc, se = finetune.accuracy_with_se(probs.argmax(1), labels)
    rows.append({'members': k, 'accuracy': acc, 'stderr': se,
                 'latency_s_per_example': latency(fitted[:k])})
  return rows


def text_task(backbones, task: str, data_dir: str, split: SplitSettings,
              train, reference=None, log=print) -> dict:
  """Fine-tunes each backbone; with several, tests the committee (mean probabilities).

  `train`: one TrainSettings, or a list of candidates chosen among on validation.
  """
  grid = _as_grid(train)
  sp = task_splits(task, data_dir, split)
  fitted = fit_members(backbones, sp, grid, log)
  probs = committee_lib.average_probabilities([p for _, p, *_ in fitted])
  pred = probs.argmax(1)
  acc, se = finetune.accuracy_with_se(pred, sp.test.labels)
  # Per-item correctness and the split's digest: two records on the same test items can be
  # compared pairwise (stlm.classify.compare), and records on different items are refused.
  out = {'task': task, 'mode': grid[0].mode, 'accuracy': acc, 'stderr': se,
         'n_test': len(sp.test),
         'test_sha256': compare_lib.test_split_digest(sp.test.texts, sp.test.labels),
         'test_correct': compare_lib.correctness(pred, sp.test.labels),
         'split': sp.info, 'pool': fitted[0][0].pool,
         'checkpoint': ','.join(bb.source for bb in backbones),
         'members': [r for _, _, r, _ in fitted],
         'settings': dataclasses.asdict(grid[0]) if len(grid) == 1 else
                     [dataclasses.asdict(g) for g in grid]}
  if len(backbones) > 1 or reference is not None:
    out['committee'] = {'size': len(backbones),
                        'latency_s_per_example': latency(fitted),
                        'latency_examples': LATENCY_EXAMPLES}
    if reference is not None:
      ref = fit_members([reference], sp, train, log)
      out['reference'] = dict(ref[0][2], latency_s_per_example=latency(ref))
  return out


def fewrel_file(data_dir: str, test_file: str = '') -> pathlib.Path:
  """The FewRel relations file; FileNotFoundError naming the flag when it is missing."""
  path = pathlib.Path(test_file) if test_file else cls_data.find_file(
      'fewrel', data_dir, cls_data.TEST_FILES['fewrel'])
  if path is None or not path.is_file():
    raise FileNotFoundError(f'--test_file {path} does not exist' if test_file else
                            f'no FewRel file: give --test_file, or --data_dir holding '
                            f'{cls_data.TEST_FILES["fewrel"]} (got {data_dir!r})')
  if path.stat().st_size == 0:
    raise cls_data.DataFormatError(f'{"--test_file" if test_file else "--data_dir"}: {path} '
                                   'is empty')
  return path


def fewrel_settings(settings) -> list[tuple[str, int, int]]:
  """(name, N, K) of each N-way K-shot setting ('5w1s')."""
  out = []
  for name in settings:
    m = re.fullmatch(r'(\d+)w(\d+)s', name)
    if not m:
      raise cli_errors.FlagError(f'--fewrel_settings: {name!r}; write N-way K-shot as e.g. '
                                 '5w1s')
    out.append((name, int(m.group(1)), int(m.group(2))))
  return out


def fewrel_task(bb, data_dir: str, test_file: str = '', settings=('5w1s', '10w5s'),
                n_episodes: int = 100, n_query: int = 5, seed: int = 0, log=print) -> dict:
  path = fewrel_file(data_dir, test_file)
  parsed = fewrel_settings(settings)
  relations = cls_data.load_fewrel(path)
  results = []
  for name, n_way, k_shot in parsed:
    r = fewrel_lib.evaluate(bb, relations, n_way, k_shot, n_query, n_episodes, seed)
    log(f'fewrel {name}: {bb.source}: accuracy {r["accuracy"]:.4f} ± {r["stderr"]:.4f} '
        f'({r["n_episodes"]} episodes)')
    results.append(r)
  first = results[0]
  return {'task': 'fewrel', 'mode': 'prototype', 'setting': first['setting'],
          'accuracy': first['accuracy'], 'stderr': first['stderr'], 'n_test': first['n_test'],
          'split': {'test_file': str(path), 'episodes_seed': seed}, 'settings': results,
          'checkpoint': bb.source}
