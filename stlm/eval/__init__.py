"""Evaluation: log-likelihood scorer, zero-shot benchmarks, perplexity; CLI `python -m stlm.eval`."""
