"""lm-evaluation-harness model `stlm`, backed by this project's jitted scorer.

Importing this module registers the model class, so after `import stlm.eval.harness`:
  lm_eval.simple_evaluate(model='stlm', model_args='checkpoint=<workdir>/export', ...)
and the harness's own CLI runs with it registered:
  python -m stlm.eval.harness --model_args checkpoint=<export> --tasks stlm_arc_easy \
      --data_dir ../shared/data/benchmarks [any other lm_eval flag]
(`--model stlm` and `--include_path` of the task files in `harness_tasks/` are added when
absent; `--data_dir` becomes the tasks' `data_dir` metadata.)

Both model kinds are served: loglikelihood and loglikelihood_rolling go through
`stlm.eval.scorer.Scorer` (end-of-text only before an empty context, as the harness's own
prefix token; `always_prefix_eot=True` restores the old convention), generate_until through
`stlm.generate.generate_batch` (greedy unless gen_kwargs ask for sampling; `max_gen_toks` in
the model's tokens, or chunks for the byte-pool kinds).
"""

from __future__ import annotations

import json
import os
import re
import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from stlm import cli_errors

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'harness_tasks')
TASK_PREFIX = 'stlm_'
_CHECKPOINT_ARG = '--model_args checkpoint'   # how messages name the export


def _bool(v) -> bool:
  return v if isinstance(v, bool) else str(v).lower() in ('1', 'true', 'yes')


@register_model('stlm')
class StlmLM(LM):
  """An stlm export as an lm_eval LM (`checkpoint=<workdir>/export`)."""

  def __init__(self, checkpoint: str | None = None, batch_size=32, always_prefix_eot=False,
               max_gen_bytes: int = 256, generate_batch_size: int = 16, exported=None,
               scorer=None, score_fraction=None, **unused):
    super().__init__()
    del unused  # device, max_batch_size, ...: the scorer picks its own device and buckets
    # pylint: disable=g-import-not-at-top  (jax and the model only when a model is built)
    from stlm.eval import zero_shot
    if exported is None:
      if not checkpoint:
        raise cli_errors.FlagError('--model_args must name checkpoint=<workdir>/export')
      exported = zero_shot.open_checkpoint(checkpoint, _CHECKPOINT_ARG)
    self.exported = exported
    bs = 32 if batch_size in (None, 'auto') else int(str(batch_size).split(':')[0])
    fraction = None if score_fraction in (None, '') else float(score_fraction)
    self.scorer = scorer or zero_shot.make_scorer(exported, bs,
                                                   always_prefix_eot=_bool(always_prefix_eot),
                                                   score_fraction=fraction)
    self.max_gen_bytes = int(max_gen_bytes)
    self.generate_batch_size = int(generate_batch_size)

  @property
  def tokenizer_name(self) -> str:
    return f'stlm-{self.exported.config.tokenizer.kind}'

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    pairs = [tuple(r.args[:2]) for r in requests]
    return [(r.logprob, r.is_greedy) for r in self.scorer.loglikelihood(pairs)]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    # The harness scores a document after its prefix token, in disjoint windows that reach
    # back a full context: exactly an empty-context loglikelihood in the scorer.
    texts = [r.args[0] for r in requests]
    return [r.logprob for r in self.scorer.loglikelihood([('', t) for t in texts])]

  def generate_until(self, requests, disable_tqdm: bool = False):
    """The harness's generate_until: requests with the same gen_kwargs are generated together
    (`generate_batch`), each cut at its first `until` string; `max_gen_toks` counts the
    model's units (tokens, or chunks for the byte-pool kinds, which are pooled per GPT-2
    token, so the same count), as the harness counts tokens; without it, max_gen_bytes bytes."""
    from stlm import generate  # pylint: disable=g-import-not-at-top
    groups = {}
    for i, r in enumerate(requests):
      context, gen_kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
      until = gen_kwargs.get('until') or ()
      until = (until,) if isinstance(until, str) else tuple(until)
      units = gen_kwargs.get('max_gen_toks')
      temperature = float(gen_kwargs.get('temperature', 0.0)) if gen_kwargs.get(
          'do_sample', False) else 0.0
      key = (until, None if units is None else int(units), temperature)
      groups.setdefault(key, []).append((i, context))
    out = [None] * len(requests)
    e = self.exported
    for (until, units, temperature), items in groups.items():
      max_bytes = (self.max_gen_bytes if units is None else
                   units * generate.BYTES_PER_UNIT_CAP)
      texts = generate.generate_batch(e.model, e.params, e.config, e.tokenizer,
                                      [context for _, context in items], max_bytes=max_bytes,
                                      temperature=temperature, stop=until, max_units=units,
                                      batch_size=self.generate_batch_size)
      for (i, _), text in zip(items, texts):
        out[i] = text.decode('utf-8', errors='replace')
    return out


def cli_argv(argv: list[str]) -> list[str]:
  """lm_eval's argv from ours: --data_dir becomes metadata; --model and our tasks added."""
  args, data_dir, i = [], None, 0
  while i < len(argv):
    a = argv[i]
    if a == '--data_dir':
      data_dir, i = argv[i + 1], i + 2
      continue
    if a.startswith('--data_dir='):
      data_dir, i = a.split('=', 1)[1], i + 1
      continue
    args.append(a)
    i += 1
  names = {a.split('=', 1)[0] for a in args}
  if '--model' not in names:
    args = ['--model', 'stlm'] + args
  if '--include_path' not in names:
    args += ['--include_path', TASKS_DIR]
  if data_dir is not None:
    meta = {}
    for j, a in enumerate(args):
      if a == '--metadata':
        meta = json.loads(args[j + 1])
        del args[j:j + 2]
        break
      if a.startswith('--metadata='):
        meta = json.loads(a.split('=', 1)[1])
        del args[j]
        break
    meta['data_dir'] = os.path.abspath(data_dir)
    args += ['--metadata', json.dumps(meta)]
  return args


def _value(argv: list[str], *names: str) -> str | None:
  """The value of the last `--name V` / `--name=V` in argv."""
  found = None
  for i, a in enumerate(argv):
    for name in names:
      if a == name and i + 1 < len(argv):
        found = argv[i + 1]
      elif a.startswith(name + '='):
        found = a.split('=', 1)[1]
  return found


def _model_args(text: str) -> dict:
  """lm_eval's `key=value,key=value` (or a JSON object) as a dict of strings."""
  text = text.strip()
  if text.startswith('{'):
    try:
      return {k: str(v) for k, v in json.loads(text).items()}
    except (ValueError, AttributeError):
      raise cli_errors.FlagError(f'--model_args={text}: not a JSON object') from None
  return dict(kv.split('=', 1) for kv in text.split(',') if '=' in kv)


def task_benchmark(task: str) -> tuple[str, str | None] | None:
  """(benchmark, split) that one of our task files reads, or None for another task."""
  path = os.path.join(TASKS_DIR, f'{task}.yaml')
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    text = f.read()
  name = re.search(r'harness_data\.(\w+)', text).group(1)
  split = re.search(r'^dataset_kwargs:\n\s+split:\s*(\S+)', text, re.MULTILINE)
  return name, split.group(1) if split else None


def check_args(argv: list[str]) -> None:
  """Refuses, before lm_eval builds anything, what our side of the run cannot use: no or a
  bad checkpoint, one of our task names that does not exist, a missing benchmark directory
  or benchmark files, an output path that cannot be written."""
  # pylint: disable=g-import-not-at-top  (jax and the model only when a model is built)
  from stlm.eval import harness_data
  from stlm.eval import loaders
  from stlm.eval import zero_shot
  if (_value(argv, '--model') or 'stlm') == 'stlm':
    checkpoint = _model_args(_value(argv, '--model_args') or '').get('checkpoint')
    if not checkpoint:
      raise cli_errors.FlagError('--model_args must name checkpoint=<workdir>/export')
    zero_shot.check_causal_export(checkpoint, _CHECKPOINT_ARG)
  data_dir = _value(argv, '--data_dir')
  if data_dir is not None and not os.path.isdir(data_dir):
    raise cli_errors.FlagError(f'--data_dir={data_dir} does not exist' if not os.path.exists(
        data_dir) else f'--data_dir={data_dir} is not a directory')
  metadata = _value(argv, '--metadata')
  try:
    metadata = json.loads(metadata) if metadata else {}
  except ValueError:
    raise cli_errors.FlagError(f'--metadata={metadata}: not JSON') from None
  if data_dir is not None:
    metadata['data_dir'] = data_dir
  tasks = [t for t in (_value(argv, '--tasks', '-t') or '').split(',') if t]
  ours = sorted(n[:-len('.yaml')] for n in os.listdir(TASKS_DIR) if n.endswith('.yaml'))
  for task in tasks:
    if task.startswith(TASK_PREFIX) and task not in ours:
      raise cli_errors.FlagError(f'--tasks: no task {task!r}; the stlm tasks are '
                                 f'{", ".join(ours)}')
    benchmark = task_benchmark(task)
    if benchmark:   # the files our task will read, where it will read them
      name, split = benchmark
      loaders.check_available(name, harness_data.data_dir_of(metadata), split)
  output = _value(argv, '--output_path', '-o')
  if output:
    if output.endswith('.json'):
      cli_errors.check_output_file('--output_path', output)
    else:
      cli_errors.check_output_dir('--output_path', output)


def _without_our_verbosity(argv: list[str]) -> list[str]:
  """argv less a numeric --verbosity (ours: tracebacks); lm_eval's takes a log level."""
  out, skip = [], False
  for i, a in enumerate(argv):
    if skip:
      skip = False
      continue
    if re.fullmatch(r'--?(verbosity|v)=-?\d+', a):
      continue
    if a in ('--verbosity', '-v') and i + 1 < len(argv) and re.fullmatch(r'-?\d+', argv[i + 1]):
      skip = True
      continue
    out.append(a)
  return out


def main() -> None:
  with cli_errors.one_line_errors():
    argv = sys.argv[1:]
    check_args(argv)
    from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
    sys.argv = [sys.argv[0]] + cli_argv(_without_our_verbosity(argv))
    try:
      cli_evaluate()
    except ValueError as e:
      # lm_eval's own check of task names (it knows the tasks of other projects too).
      if str(e).startswith('Tasks not found'):
        raise cli_errors.FlagError(f'--tasks: {e}') from e
      raise


if __name__ == '__main__':
  main()
