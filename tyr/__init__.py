"""Tyr: global structural pruning of decoder-only LLMs (Týr-the-Pruner + EvoPress search)."""

from tyr.errors import TyrError

__all__ = ["TyrError"]
__version__ = "0.1.0"
