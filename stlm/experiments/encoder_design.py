"""The design of the tiny-encoder study: every size it runs at, and the comparisons it makes.

A `Design` is built once (from a preset and the flags given) and checked in __post_init__;
its arms are the pretraining subsets (the size axis, then the overlap axis) and its cells
the (arm, task, fine-tuning rows) of every pretrained-vs-scratch comparison.
"""

from __future__ import annotations

import dataclasses

from stlm import cli_errors
from stlm.experiments import encoder_corpora
from stlm.experiments import encoder_stats

TASK_DIRS = {'agnews': 'classification/agnews', 'dbpedia': 'classification/dbpedia',
             'fewrel': 'classification/fewrel'}


@dataclasses.dataclass(frozen=True)
class Design:
  """Every size of the study; built once from the flags."""
  shallow: str                  # configs/encoder.py presets
  deep: str
  vocab_size: int               # pieces of the one fixed tokenizer
  wiki_bytes: tuple[int, ...]   # the size axis
  overlap_bytes: int            # every corpus of the overlap axis
  corpora: tuple[str, ...]
  seeds: int
  pretrain_steps: int
  deep_steps: int
  finetune_rows: tuple[int, ...]   # AG News rows on the size axis
  task_rows: int                # rows of every other (task, arm)
  val_rows: int
  max_test: int                 # 0 = the whole test split
  finetune_steps: int
  lr_grid: tuple[float, ...]    # each fine-tune picks its lr on validation
  tasks: tuple[str, ...]
  episodes: int
  committee_size: int

  def __post_init__(self):
    checks = [('--wiki_bytes', self.wiki_bytes and min(self.wiki_bytes) > 0),
              ('--overlap_bytes', self.overlap_bytes > 0),
              ('--seeds', self.seeds >= 2),
              ('--pretrain_steps', self.pretrain_steps >= 1),
              ('--deep_steps', self.deep_steps >= 1),
              ('--finetune_rows', self.finetune_rows and min(self.finetune_rows) > 0),
              ('--task_rows', self.task_rows > 0), ('--val_rows', self.val_rows > 0),
              ('--max_test', self.max_test >= 0), ('--finetune_steps', self.finetune_steps >= 1),
              ('--lr_grid', self.lr_grid and min(self.lr_grid) > 0),
              ('--episodes', self.episodes >= 2), ('--committee_size', self.committee_size >= 0)]
    for flag, ok in checks:
      if not ok:
        raise cli_errors.FlagError(f'{flag}={getattr(self, flag[2:])!r} is out of range (seeds '
                                   '>= 2 for a seed SE, episodes >= 2, sizes and steps >= 1)')
    for task in self.tasks:
      if task not in TASK_DIRS:
        raise cli_errors.FlagError(f'--tasks: unknown task {task!r}; choose from '
                                   f'{", ".join(TASK_DIRS)}')
    if 'agnews' not in self.tasks:
      raise cli_errors.FlagError('--tasks must include agnews: the fine-tuning-size axis and '
                                 'the committee use it')
    if self.task_rows not in self.finetune_rows:
      raise cli_errors.FlagError(f'--task_rows={self.task_rows} must be one of --finetune_rows='
                                 f'{",".join(map(str, self.finetune_rows))}: the size and '
                                 'overlap axes meet at that fine-tuning size')
    if 'wikipedia' not in self.corpora:
      raise cli_errors.FlagError('--corpora must include wikipedia: the size axis is cut '
                                 'from it')

  @classmethod
  def cpu(cls) -> 'Design':
    """A size for one CPU in a few hours: the mini models, 3 seeds, a 30x size range."""
    return cls(shallow='bert1_mini', deep='bert6_mini', vocab_size=2048,
               wiki_bytes=(100_000, 300_000, 800_000, 3_000_000), overlap_bytes=800_000,
               corpora=tuple(encoder_corpora.CORPORA), seeds=3, pretrain_steps=300,
               deep_steps=1200, finetune_rows=(250, 1000, 4000), task_rows=1000, val_rows=500,
               max_test=0, finetune_steps=300, lr_grid=(1e-3, 3e-3),
               tasks=('agnews', 'dbpedia', 'fewrel'), episodes=100, committee_size=5)

  @classmethod
  def accelerator(cls) -> 'Design':
    """The study's widths (192), 5 seeds and 10x longer pretraining, a 300x size range."""
    return dataclasses.replace(cls.cpu(), shallow='bert1', deep='bert6', vocab_size=4096,
                               wiki_bytes=(100_000, 1_000_000, 3_000_000, 30_000_000),
                               seeds=5, pretrain_steps=3000, deep_steps=12000,
                               finetune_steps=1000, committee_size=8)


SCALES = {'cpu': Design.cpu, 'accelerator': Design.accelerator}


def arms(d: Design) -> list[tuple[str, int]]:
  """(corpus, bytes) of every pretraining subset: the size axis, then the overlap axis."""
  out = [('wikipedia', b) for b in d.wiki_bytes]
  out += [(c, d.overlap_bytes) for c in d.corpora if (c, d.overlap_bytes) not in out]
  return out


def cells(d: Design) -> list[tuple[tuple[str, int], str, int]]:
  """(arm, task, rows) of every pretrained-vs-scratch comparison of the study."""
  out = []
  for arm in arms(d):
    sized = arm[0] == 'wikipedia' and arm[1] in d.wiki_bytes
    for task in d.tasks:
      rows = (0,) if task == 'fewrel' else (
          d.finetune_rows if task == 'agnews' and sized else (d.task_rows,))
      out += [(arm, task, r) for r in rows]
  return out


def on_size_axis(d: Design, r: dict) -> bool:
  return r['corpus'] == 'wikipedia' and r['budget'] in d.wiki_bytes


def on_overlap_axis(d: Design, r: dict) -> bool:
  return r['budget'] == d.overlap_bytes and r['corpus'] in d.corpora


def gap_rows(d: Design, results: dict, manifests: dict, overlaps: dict) -> list[dict]:
  rows = []
  for arm, task, n in cells(d):
    pre = [results[(arm, s, task, n)]['scores'] for s in range(d.seeds)]
    scr = [results[('scratch', s, task, n)]['scores'] for s in range(d.seeds)]
    g = encoder_stats.seed_gap(pre, scr)
    rows.append({'corpus': arm[0], 'budget': arm[1], 'bytes': manifests[arm]['bytes'],
                 'documents': manifests[arm]['documents'], 'task': task, 'rows': n,
                 **g, **{f'overlap_{k}': v for k, v in overlaps[(arm, task)].items()}})
  return rows
