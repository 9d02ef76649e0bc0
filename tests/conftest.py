"""Shared fixtures: a tiny saved checkpoint with a char tokenizer and small text corpora (no downloads)."""

from __future__ import annotations

import pytest

from tests.tiny import save_tiny_checkpoint, write_corpus


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A tiny Llama-GQA checkpoint folder plus calibration and evaluation text files."""
    root = tmp_path_factory.mktemp("tiny-assets")
    return {
        "model": str(save_tiny_checkpoint(root / "model")),
        "data": str(write_corpus(root / "calib.txt", num_docs=40, seed=0)),
        "eval": str(write_corpus(root / "eval.txt", num_docs=10, seed=1)),
    }


def smoke_args(assets: dict, out, *extra: str) -> list[str]:
    return [
        "run",
        "--model",
        assets["model"],
        "--data",
        assets["data"],
        "--eval-data",
        assets["eval"],
        "--schedule",
        "smoke",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]
