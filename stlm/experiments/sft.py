"""Instruction tuning at the tiny preset: a base run, SFT with and without the response mask.

  python -m stlm.experiments.sft --corpus=../shared/data/corpus/wikipedia_en \
      --instruct=../shared/data/instruct/alpaca_4500.json \
      --data_dir=../shared/data/benchmarks --workdir=runs/sft_study

Three runs, each `loop.train` of a config file as main.py runs it:
  base     configs/<--model>.py:tiny on --corpus (data.source=local), --pretrain_steps;
  sft      configs/sft.py (:tiny, or :byte_pool) from base's export on --instruct, loss on
           responses only;
  sft_all  the same with sft.loss_on=all (the loss on every token).
Each export then gets results.json beside it (as `python -m stlm.eval` writes it): held-out
response bits per byte of --instruct (the same held-out items for all three; the base model
through the same template), the --mc_benchmarks on --mc_limit items, and GSM8K and LAMBADA
generation on --gen_limit items. --samples held-out instructions (drawn with --seed) are
answered greedily by each model (samples.json), and --stop_items more are checked for the
end-of-response marker (end_marker.json). The tables go to <workdir>/table.md. A
finished step is not redone, so an interrupted run resumes.
"""

import json
import os
import random
import time

from absl import app
from absl import flags
from absl import logging as absl_logging

from stlm import cli_errors
from stlm import export as export_lib
from stlm import generate
from stlm.config import files
from stlm.data import chat
from stlm.data import pipeline
from stlm.data import tfds_builders
from stlm.eval import generative
from stlm.eval import instruct as instruct_lib
from stlm.eval import zero_shot
from stlm.experiments import heldout
from stlm.train import loop

RUNS = ('base', 'sft', 'sft_all')

_CORPUS = flags.DEFINE_string('corpus', '../shared/data/corpus/wikipedia_en',
                              'pretraining text: .txt/.jsonl file or folder (data.source=local).')
_INSTRUCT = flags.DEFINE_string('instruct', '../shared/data/instruct/alpaca_4500.json',
                                'instruction file (alpaca or chat layout).')
_DATA_DIR = flags.DEFINE_string('data_dir', '../shared/data/benchmarks',
                                'benchmark releases (stlm.eval --data_dir).')
_CONFIGS_DIR = flags.DEFINE_string('configs_dir', files.DEFAULT_DIR, 'folder of the configs.')
_MODEL = flags.DEFINE_enum('model', 'baseline', ['baseline', 'byte_pool'], 'configs/<model>.py '
                           'for the base run; SFT takes the same model (configs/sft.py:byte_pool).')
_PRE_STEPS = flags.DEFINE_integer('pretrain_steps', 600, 'steps of the base run.')
_SFT_STEPS = flags.DEFINE_integer('sft_steps', 300, 'steps of each fine-tuning run.')
_SEED = flags.DEFINE_integer('seed', 0, 'seed of init, data order and the sampled instructions.')
_MC = flags.DEFINE_list('mc_benchmarks', 'blimp,hellaswag,arc_easy,winogrande',
                        'multiple-choice benchmarks scored beside the generative ones.')
_MC_LIMIT = flags.DEFINE_integer('mc_limit', 500, 'items per multiple-choice benchmark.')
_GEN_LIMIT = flags.DEFINE_integer('gen_limit', 200, 'items per generative task.')
_GSM_SPLIT = flags.DEFINE_string('gsm8k_split', 'test', 'GSM8K split scored (train: shots '
                                 'from the other train items).')
_SAMPLES = flags.DEFINE_integer('samples', 4, 'held-out instructions answered by each model.')
_STOP_ITEMS = flags.DEFINE_integer('stop_items', 50, 'held-out instructions on which each model\'s '
                                  'greedy reply is checked for the end-of-response marker.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/sft_study', 'runs, results and table.md.')


def base_config():
  c = files.load(os.path.join(_CONFIGS_DIR.value, f'{_MODEL.value}.py'), 'tiny')
  c.seed = _SEED.value
  c.data.update(source='local', path=os.path.abspath(_CORPUS.value), decode_errors='replace',
                val_fraction=0.02)
  steps = _PRE_STEPS.value
  c.train.update(steps=steps, warmup_steps=max(steps // 10, 1), eval_every=max(steps // 3, 1))
  return c


def sft_config(loss_on: str):
  c = files.load(os.path.join(_CONFIGS_DIR.value, 'sft.py'),
                 'byte_pool' if _MODEL.value == 'byte_pool' else 'tiny')
  c.seed = _SEED.value
  c.data.path = os.path.abspath(_INSTRUCT.value)
  c.sft.loss_on = loss_on
  steps = _SFT_STEPS.value
  c.train.update(steps=steps, warmup_steps=max(steps // 10, 1), eval_every=max(steps // 3, 1),
                 init_from=os.path.join(os.path.abspath(_WORKDIR.value), 'base', 'export'))
  return c


def check_inputs() -> None:
  for flag, path in (('--corpus', _CORPUS.value), ('--instruct', _INSTRUCT.value),
                     ('--data_dir', _DATA_DIR.value)):
    if not os.path.exists(path):
      raise cli_errors.FlagError(f'{flag}={path} does not exist')
  for flag, value in (('--pretrain_steps', _PRE_STEPS.value), ('--sft_steps', _SFT_STEPS.value),
                      ('--gen_limit', _GEN_LIMIT.value), ('--mc_limit', _MC_LIMIT.value)):
    if value < 1:
      raise cli_errors.FlagError(f'{flag}={value} must be >= 1')
  cli_errors.check_output_dir('--workdir', _WORKDIR.value)


def evaluate(export_dir: str) -> dict:
  """results.json beside the export: response bits per byte, multiple choice, generative."""
  path = os.path.join(os.path.dirname(export_dir), 'results.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  exported = export_lib.load_export(export_dir)
  start = time.perf_counter()
  tuned = bool(exported.config.sft.get('template'))
  # The same held-out items for every model: the SFT runs' split of --instruct.
  instruct = instruct_lib.response_bits_per_byte(
      exported, os.path.abspath(_INSTRUCT.value), template='' if tuned else 'alpaca',
      val_fraction=sft_config('response').data.val_fraction)
  results = zero_shot.run_benchmarks(exported, _MC.value, _DATA_DIR.value, _MC_LIMIT.value,
                                     seed=_SEED.value) if _MC.value else {}
  results.update(generative.run_tasks(exported, generative.TASKS, _DATA_DIR.value,
                                      limit=_GEN_LIMIT.value, gsm8k_split=_GSM_SPLIT.value))
  out = zero_shot.write_results(path, exported, export_dir, results, instruct=instruct)
  print(f'{export_dir}: evaluated in {time.perf_counter() - start:.0f} s', flush=True)
  return out


def held_out_turns(k: int) -> list[list[dict]]:
  """k held-out conversations of the SFT split, drawn with --seed."""
  docs = pipeline.document_dataset(sft_config('response'), 'validation')
  idx = sorted(random.Random(_SEED.value).sample(range(len(docs)), min(k, len(docs))))
  return [chat.decode_record(tfds_builders.record_text(docs[i])) for i in idx]


def answer_samples(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'samples.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  template = chat.get_template('alpaca')
  out = [dict(turns=t, answers={}) for t in held_out_turns(_SAMPLES.value)]
  for run in RUNS:
    exported = export_lib.load_export(os.path.join(workdir, run, 'export'))
    for s in out:
      prompt_turns = s['turns'][:-1]
      s['answers'][run] = generate.chat_reply(exported, prompt_turns, template,
                                              max_bytes=300, temperature=0.0)
  with cli_errors.atomic_file(path) as f:
    json.dump(out, f, indent=2, ensure_ascii=False)
  return out


def end_marker_rates(workdir: str) -> dict:
  """Per run: the share of --stop_items held-out instructions whose greedy reply (300 bytes at
  most) writes the end-of-response marker, and the mean reply length before it."""
  path = os.path.join(workdir, 'end_marker.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  template = chat.get_template('alpaca')
  items = held_out_turns(_STOP_ITEMS.value)
  out = {}
  for run in RUNS:
    exported = export_lib.load_export(os.path.join(workdir, run, 'export'))
    ended, lengths = [], []
    for turns in items:
      text = generate.generate(exported.model, exported.params, exported.config,
                               exported.tokenizer, template.prompt(turns[:-1]), max_bytes=300,
                               temperature=0.0).decode('utf-8', errors='replace')
      ended.append(float(template.end in text))
      lengths.append(len(text.split(template.end)[0]))
    out[run] = dict(items=len(items), end_marker=sum(ended) / len(ended),
                    mean_reply_chars=sum(lengths) / len(lengths))
  with cli_errors.atomic_file(path) as f:
    json.dump(out, f, indent=2)
  return out


def table(results: dict[str, dict]) -> str:
  def pm(entry, key, scale=100.0):
    return f'{scale * entry[key]:.1f} ± {scale * entry[key + "_stderr"]:.1f}'
  lines = ['| run | held-out response bits/byte | ' + ' | '.join(_MC.value)
           + ' | GSM8K strict | GSM8K flexible | LAMBADA (greedy) |',
           '|---|---|' + '---|' * (len(_MC.value) + 3)]
  for run, r in results.items():
    b = r['benchmarks']
    mc = [pm(b[n], b[n].get('main', 'acc')) for n in _MC.value]
    lines.append(f'| {run} | {r["instruct"]["bits_per_byte"]:.4f} | ' + ' | '.join(mc)
                 + f' | {pm(b["gsm8k"], "exact_match")} | {pm(b["gsm8k"], "exact_match_flexible")}'
                 f' | {pm(b["lambada_gen"], "acc")} |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)
  check_inputs()
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  configs = dict(base=base_config(), sft=sft_config('response'), sft_all=sft_config('all'))
  results = {}
  for run in RUNS:
    run_dir = os.path.join(workdir, run)
    if not heldout.finished(run_dir):
      start = time.perf_counter()
      loop.train(configs[run], run_dir)
      print(f'{run}: trained in {time.perf_counter() - start:.0f} s', flush=True)
    results[run] = evaluate(os.path.join(run_dir, 'export'))
  samples = answer_samples(workdir)
  print(json.dumps(end_marker_rates(workdir)), flush=True)
  text = table(results)
  with cli_errors.atomic_file(os.path.join(workdir, 'table.md')) as f:
    f.write(f'base {_PRE_STEPS.value} steps on {_CORPUS.value}; SFT {_SFT_STEPS.value} steps on '
            f'{_INSTRUCT.value}; seed {_SEED.value}\n\n{text}\n')
  print(text)
  for s in samples:
    print(json.dumps(s, ensure_ascii=False))


if __name__ == '__main__':
  cli_errors.run(main)
