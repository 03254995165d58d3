"""Evaluation: log-likelihood scorer, benchmarks, perplexity; CLI `python -m stlm.eval`."""


def run_benchmarks(exported, names, data_dir, limit=None, **kwargs) -> dict:
  """See `stlm.eval.zero_shot.run_benchmarks` (imported lazily: it pulls in jax)."""
  from stlm.eval import zero_shot  # pylint: disable=g-import-not-at-top
  return zero_shot.run_benchmarks(exported, names, data_dir, limit, **kwargs)
