"""Shared helpers for benchmark scripts: the standard SmolLM2 setting, timing, result files."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tyr.config import RunConfig, resolve_config
from tyr.io import atomic_write_json
from tyr.pipeline import held_out_tokens

RESULTS = Path(__file__).resolve().parent / "results"

# The issues' reference setting: SmolLM2-135M, 64x512 calibration tokens of lee-background, held-out `lee`
# in non-overlapping 512-token windows.
REFERENCE_OVERRIDES = [
    "model.name=smollm2-135m",
    "data.calibration=lee-background",
    "data.eval=lee",
    "data.num_sequences=64",
    "data.seq_len=512",
]


def reference_config(*overrides: str) -> RunConfig:
    return resolve_config(None, [*REFERENCE_OVERRIDES, *overrides])


def eval_tokens(session) -> torch.Tensor:
    return held_out_tokens(session.cfg, session.tokenizer)


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """Median wall time of `repeats` calls and the last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def write_results(name: str, payload: dict) -> Path:
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, payload)
    return path


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        return (
            f"{v:.3g}"
            if isinstance(v, float) and abs(v) < 1000
            else (f"{v:.0f}" if isinstance(v, float) else str(v))
        )

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def dump(obj: object) -> str:
    return json.dumps(obj, indent=2)
