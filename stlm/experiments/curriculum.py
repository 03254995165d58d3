"""Data phases against a shuffled mix and one source: TinyStories then Wikipedia, at equal steps.

  python -m stlm.experiments.curriculum --data_dir=../shared/data --workdir=runs/curriculum \
      --steps=400 --seed=0 --out=results/curriculum_table.md

Arms (configs/curriculum.py, tiny preset by default, same seed, steps, batch and schedule):
- phases: TinyStories (data.sources.stories) for the first --switch steps, then Wikipedia;
- mix: one phase mixing both sources all along, weighted so each source's expected share of
  the trained tokens is its share of the phases arm's steps. grain mixes per example (a
  window of <= context tokens); TinyStories examples are shorter than Wikipedia's, so each
  weight is the step share divided by the source's mean tokens per example, measured on its
  first --length_docs training documents;
- wiki: Wikipedia alone for every step.
Each export then scores the held-out documents of both corpora (the first --eval_docs of
each source's validation split, which no arm trains on) with the scorer: bits per byte =
summed nats / ln 2 / UTF-8 bytes. The table goes to --out (and <workdir>/table.md), the three
runs' training loss with the phase boundary to <workdir>/train_loss.png. A finished arm is
not retrained, so an interrupted comparison resumes.
"""

import json
import os
import pathlib
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax

from stlm import cli_errors
from stlm import export as export_lib
from stlm import tokenizers
from stlm.config import files
from stlm.data import featurize
from stlm.data import pipeline
from stlm.data import tfds_builders
from stlm.eval import perplexity
from stlm.eval import scorer as scorer_lib
from stlm.report import collect
from stlm.report import plots
from stlm.train import loop

ARMS = ('phases', 'mix', 'wiki')
STORIES, WIKI = 'stories', 'wiki'
# As configs/curriculum.py names them (stlm does not import the configs folder).
STORIES_FILE = 'corpus/tinystories/train_head_cased.txt'
WIKI_DIR = 'corpus/wikipedia_en'

_DATA_DIR = flags.DEFINE_string('data_dir', '../shared/data',
                                f'shared data root (holds {STORIES_FILE} and {WIKI_DIR}).')
_CONFIGS_DIR = flags.DEFINE_string('configs_dir', files.DEFAULT_DIR,
                                   'folder holding curriculum.py.')
_PRESET = flags.DEFINE_string('preset', 'tiny', 'size preset of configs/curriculum.py.')
_STEPS = flags.DEFINE_integer('steps', 400, 'train steps of every arm.')
_SWITCH = flags.DEFINE_integer('switch', 0, 'phases arm: last TinyStories step (0 = steps / 2).')
_SEED = flags.DEFINE_integer('seed', 0, 'seed of init and data order (every arm).')
_ARMS = flags.DEFINE_list('arms', ','.join(ARMS), f'arms to run, of {",".join(ARMS)}.')
_EVAL_DOCS = flags.DEFINE_integer('eval_docs', 100, 'held-out documents scored per corpus.')
_LENGTH_DOCS = flags.DEFINE_integer('length_docs', 300, 'mix arm: training documents per '
                                    'source whose mean tokens per example set its weight.')
_TFDS_DIR = flags.DEFINE_string('tfds_dir', '', "tfds ArrayRecord cache ('' = <workdir>/tfds).")
_WORKDIR = flags.DEFINE_string('workdir', 'runs/curriculum', 'one subdirectory per arm.')
_OUT = flags.DEFINE_string('out', '', 'also write the table here (markdown).')


def switch_step() -> int:
  return _SWITCH.value or _STEPS.value // 2


def base_config():
  """configs/curriculum.py at --preset with the shared corpora, --steps and --seed."""
  c = files.load(os.path.join(_CONFIGS_DIR.value, 'curriculum.py'), _PRESET.value)
  root = os.path.abspath(_DATA_DIR.value)
  c.data.sources.stories.path = os.path.join(root, STORIES_FILE)
  c.data.sources.wiki.path = os.path.join(root, WIKI_DIR)
  c.data.data_dir = os.path.abspath(_TFDS_DIR.value or os.path.join(_WORKDIR.value, 'tfds'))
  c.seed = _SEED.value
  steps = _STEPS.value
  c.train.update(steps=steps, warmup_steps=min(c.train.warmup_steps, steps // 10),
                 eval_every=max(steps // 4, 1), log_every=max(steps // 40, 1),
                 ckpt_every=max(steps // 4, 1))
  return c


def mean_tokens_per_example(config, name: str) -> float:
  """Tokens per training example (window) of source `name`, over its first documents."""
  one = config.copy_and_resolve_references()
  one.data = tfds_builders.source_config(config.data, name)
  docs = pipeline.document_dataset(one, 'train')
  f = featurize.TokenFeaturizer(tokenizers.build_tokenizer(config.tokenizer),
                                config.model.max_len)
  lengths = [len(e['targets']) for i in range(min(_LENGTH_DOCS.value, len(docs)))
             for e in f.document(tfds_builders.record_text(docs[i]))]
  return sum(lengths) / max(len(lengths), 1)


def mix_spec(config) -> tuple[str, dict]:
  """The mix arm's one phase: weights giving each source its phases-arm share of tokens."""
  path = os.path.join(_WORKDIR.value, 'example_lengths.json')
  if os.path.exists(path):
    with open(path) as f:
      lengths = json.load(f)
  else:
    lengths = {n: mean_tokens_per_example(config, n) for n in (STORIES, WIKI)}
    with open(path, 'w') as f:
      json.dump(lengths, f, indent=1)
  shares = {STORIES: switch_step(), WIKI: _STEPS.value - switch_step()}
  weights = {n: shares[n] / lengths[n] for n in shares}
  scale = min(weights.values())
  spec = '+'.join(f'{n}*{weights[n] / scale:.4f}' for n in (STORIES, WIKI))
  return spec, lengths


def arm_config(arm: str):
  c = base_config()
  c.name = f'curriculum_{arm}'
  if arm == 'phases':
    c.data.phases = f'{STORIES}:{switch_step()},{WIKI}'
  elif arm == 'mix':
    c.data.phases = mix_spec(c)[0]
  elif arm == 'wiki':
    c.data.phases = WIKI
  else:
    raise app.UsageError(f'--arms: unknown {arm!r}; choose from {", ".join(ARMS)}')
  return c


def held_out_texts(config, name: str) -> list[str]:
  one = config.copy_and_resolve_references()
  one.data = tfds_builders.source_config(config.data, name)
  docs = pipeline.document_dataset(one, 'validation')
  return [tfds_builders.record_text(docs[i]) for i in range(min(_EVAL_DOCS.value, len(docs)))]


def run_arm(arm: str) -> dict:
  """Trains the arm (unless done) and scores its export on both held-out sets."""
  config = arm_config(arm)
  workdir = os.path.join(_WORKDIR.value, arm)
  result_path = os.path.join(workdir, 'result.json')
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  start = time.perf_counter()
  loop.train(config, workdir)
  result = dict(arm=arm, phases=config.data.phases, steps=config.train.steps, seed=config.seed,
                train_wall_s=time.perf_counter() - start)
  exported = export_lib.load_export(os.path.join(workdir, 'export'))
  scorer = scorer_lib.Scorer(exported.model, exported.params, exported.featurizer)
  for name in (WIKI, STORIES):
    ppl = perplexity.perplexity(scorer, held_out_texts(config, name))
    result[f'{name}_bits_per_byte'] = ppl['bits_per_byte']
    result[f'{name}_documents'] = ppl['documents']
    result[f'{name}_bytes'] = ppl['bytes']
  with open(result_path, 'w') as f:
    json.dump(result, f, indent=1)
  return result


def table(results: list[dict]) -> str:
  lines = ['| arm | data.phases | held-out Wikipedia bits/byte | held-out TinyStories bits/byte '
           '| train wall s |', '|---|---|---|---|---|']
  for r in results:
    lines.append(f"| {r['arm']} | `{r['phases']}` | {r['wiki_bits_per_byte']:.4f} | "
                 f"{r['stories_bits_per_byte']:.4f} | {r['train_wall_s']:.0f} |")
  return '\n'.join(lines)


def check_inputs() -> None:
  for arm in _ARMS.value:
    if arm not in ARMS:
      raise app.UsageError(f'--arms: unknown {arm!r}; choose from {", ".join(ARMS)}')
  for flag, value in (('--steps', _STEPS.value), ('--eval_docs', _EVAL_DOCS.value),
                      ('--length_docs', _LENGTH_DOCS.value)):
    if value < 1:
      raise cli_errors.FlagError(f'{flag}={value} must be >= 1')
  if not 0 <= _SWITCH.value < _STEPS.value:
    raise cli_errors.FlagError(f'--switch={_SWITCH.value} must be in [0, --steps)')
  for rel in (STORIES_FILE, WIKI_DIR):
    if not os.path.exists(os.path.join(_DATA_DIR.value, rel)):
      raise cli_errors.FlagError(f'--data_dir={_DATA_DIR.value} has no {rel}')
  if not os.path.isfile(os.path.join(_CONFIGS_DIR.value, 'curriculum.py')):
    raise cli_errors.FlagError(f'--configs_dir={_CONFIGS_DIR.value} has no curriculum.py')
  cli_errors.check_output_dir('--workdir', _WORKDIR.value)
  if _OUT.value:
    cli_errors.check_output_file('--out', _OUT.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)
  check_inputs()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  results = []
  for arm in _ARMS.value:
    results.append(run_arm(arm))
    c = base_config()
    text = (f'configs/curriculum.py:{_PRESET.value}, {_STEPS.value} steps of '
            f'{c.train.batch_size} x {c.model.max_len} tokens, seed {_SEED.value}, switch after '
            f'step {switch_step()}; {_EVAL_DOCS.value} held-out documents per corpus; '
            f'{jax.device_count()} x {jax.devices()[0].device_kind}\n\n{table(results)}\n')
    with open(os.path.join(_WORKDIR.value, 'table.md'), 'w') as f:
      f.write(text)
    print(text, flush=True)
  if _OUT.value:
    with cli_errors.atomic_file(_OUT.value) as f:
      f.write(text)
  runs = [collect.load_run(pathlib.Path(_WORKDIR.value, a), a) for a in _ARMS.value]
  plots.training_loss(runs, os.path.join(_WORKDIR.value, 'train_loss.png'))


if __name__ == '__main__':
  cli_errors.run(main)
