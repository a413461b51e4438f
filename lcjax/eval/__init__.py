"""Evaluation: retrieval accuracy by length x depth, perplexity by position, plots."""
from lcjax.eval.run import evaluate, format_results
