"""Tyr: global structural pruning of decoder-only LLMs (Týr-the-Pruner + EvoPress search)."""

from importlib import metadata

from tyr.errors import TyrError

__all__ = ["TyrError", "load_pruned"]


def _distribution_version(distribution: str = "tyr-pruner") -> str:
    """The installed version (pyproject.toml's `version` is the one source); "0+unknown" without metadata."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:  # a bare source tree on sys.path, never installed
        return "0+unknown"


__version__ = _distribution_version()


def load_pruned(path, **kwargs):
    """Load a folder written by `tyr export` without trust_remote_code (see `tyr.export.load_pruned`)."""
    from tyr.export import load_pruned as _load_pruned

    return _load_pruned(path, **kwargs)
