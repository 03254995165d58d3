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
`stlm.generate` (greedy unless gen_kwargs ask for sampling).
"""

from __future__ import annotations

import json
import os
import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'harness_tasks')


def _bool(v) -> bool:
  return v if isinstance(v, bool) else str(v).lower() in ('1', 'true', 'yes')


@register_model('stlm')
class StlmLM(LM):
  """An stlm export as an lm_eval LM (`checkpoint=<workdir>/export`)."""

  def __init__(self, checkpoint: str | None = None, batch_size=32, always_prefix_eot=False,
               max_gen_bytes: int = 256, exported=None, scorer=None, score_fraction=None,
               **unused):
    super().__init__()
    del unused  # device, max_batch_size, ...: the scorer picks its own device and buckets
    # pylint: disable=g-import-not-at-top  (jax and the model only when a model is built)
    from stlm.eval import zero_shot
    if exported is None:
      if not checkpoint:
        raise ValueError('model_args must name checkpoint=<workdir>/export')
      exported = zero_shot.open_checkpoint(checkpoint)
    self.exported = exported
    bs = 32 if batch_size in (None, 'auto') else int(str(batch_size).split(':')[0])
    fraction = None if score_fraction in (None, '') else float(score_fraction)
    self.scorer = scorer or zero_shot.make_scorer(exported, bs,
                                                   always_prefix_eot=_bool(always_prefix_eot),
                                                   score_fraction=fraction)
    self.max_gen_bytes = int(max_gen_bytes)

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
    from stlm import generate  # pylint: disable=g-import-not-at-top
    out = []
    for r in requests:
      context, gen_kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
      until = gen_kwargs.get('until') or []
      until = [until] if isinstance(until, str) else list(until)
      max_bytes = int(gen_kwargs.get('max_gen_toks', self.max_gen_bytes))
      temperature = float(gen_kwargs.get('temperature', 0.0)) if gen_kwargs.get(
          'do_sample', False) else 0.0
      text = generate.generate_text(self.exported, context, max_bytes=max_bytes,
                                    temperature=temperature)
      for stop in until:
        if stop and stop in text:
          text = text[:text.index(stop)]
      out.append(text)
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


def main() -> None:
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  sys.argv = [sys.argv[0]] + cli_argv(sys.argv[1:])
  cli_evaluate()


if __name__ == '__main__':
  main()
