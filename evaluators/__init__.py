"""Evaluators: teacher top-k targets, sparse KL fitness, perplexity."""
