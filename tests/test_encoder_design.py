"""Tests for stlm/experiments/encoder_design: the presets, their checks, arms and cells."""

import dataclasses

import pytest

from stlm import cli_errors
from stlm.experiments import encoder_design as ed


def _small(**change):
  small = dict(wiki_bytes=(1000, 30_000), overlap_bytes=30_000, corpora=('wikipedia', 'lambada'),
               finetune_rows=(250, 1000), task_rows=1000, tasks=('agnews', 'fewrel'))
  return dataclasses.replace(ed.Design.cpu(), **{**small, **change})


def test_presets_vary_every_variable():
  for d in (ed.Design.cpu(), ed.Design.accelerator()):
    assert max(d.wiki_bytes) / min(d.wiki_bytes) >= 30
    assert len(d.corpora) >= 3 and d.seeds >= 2 and len(d.finetune_rows) >= 3
    assert d.deep_steps > d.pretrain_steps


def test_arms_are_the_size_axis_then_the_other_corpora_once():
  assert ed.arms(_small()) == [('wikipedia', 1000), ('wikipedia', 30_000), ('lambada', 30_000)]
  assert ed.arms(_small(overlap_bytes=5000))[-2:] == [('wikipedia', 5000), ('lambada', 5000)]


def test_cells_vary_fine_tuning_rows_on_the_size_axis_only():
  cells = ed.cells(_small())
  assert (('wikipedia', 1000), 'agnews', 250) in cells
  assert (('lambada', 30_000), 'agnews', 1000) in cells
  assert (('lambada', 30_000), 'agnews', 250) not in cells
  assert [c for c in cells if c[1] == 'fewrel'] == [(a, 'fewrel', 0) for a in ed.arms(_small())]
  assert len(cells) == 2 * 2 + 1 + 3


@pytest.mark.parametrize('change, message', [
    (dict(seeds=1), '--seeds=1 is out of range'),
    (dict(wiki_bytes=()), '--wiki_bytes=() is out of range'),
    (dict(lr_grid=(0.0,)), '--lr_grid=(0.0,) is out of range'),
    (dict(tasks=('agnews', 'imdb')), "--tasks: unknown task 'imdb'"),
    (dict(tasks=('fewrel',)), '--tasks must include agnews'),
    (dict(corpora=('lambada',)), '--corpora must include wikipedia'),
    (dict(task_rows=500), '--task_rows=500 must be one of --finetune_rows=250,1000'),
])
def test_bad_designs_name_their_flag(change, message):
  with pytest.raises(cli_errors.FlagError, match=message.replace('(', r'\(').replace(')', r'\)')):
    _small(**change)


def test_axes_membership():
  d = _small()
  assert ed.on_size_axis(d, {'corpus': 'wikipedia', 'budget': 1000})
  assert not ed.on_size_axis(d, {'corpus': 'lambada', 'budget': 30_000})
  assert ed.on_overlap_axis(d, {'corpus': 'wikipedia', 'budget': 30_000})
  assert not ed.on_overlap_axis(d, {'corpus': 'wikipedia', 'budget': 1000})
