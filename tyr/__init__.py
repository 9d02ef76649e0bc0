"""Tyr: global structural pruning of decoder-only LLMs (Týr-the-Pruner + EvoPress search)."""

from tyr.errors import TyrError

__all__ = ["TyrError", "load_pruned"]
__version__ = "0.1.0"


def load_pruned(path, **kwargs):
    """Load a folder written by `tyr export` without trust_remote_code (see `tyr.export.load_pruned`)."""
    from tyr.export import load_pruned as _load_pruned

    return _load_pruned(path, **kwargs)
