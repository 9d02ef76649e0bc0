"""`tyr status RUN`: where a run stands (stage, generation, best fitness, ETA), read from its files only.

The readers here (`read_config`, `read_json`, `read_history`) are shared with `tyr report`. They read the run's
files as plain data (never through the typed config), so a run written by an older or newer Tyr still reads.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from tyr.errors import TyrError

try:
    from tyr.config import ONE_SHOT_METHODS
except ImportError:  # a Tyr without search.method: every run is an evolutionary search
    ONE_SHOT_METHODS = ("uniform", "owl", "layer-error")


def read_config(run: Path) -> dict:
    """RUN/config.yaml as a dict; TyrError when `run` is not a run directory."""
    if not run.is_dir():
        raise TyrError(f"run directory {run} does not exist")
    path = run / "config.yaml"
    if not path.is_file():
        raise TyrError(f"{run} is not a Tyr run directory (no config.yaml)")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TyrError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise TyrError(f"{path} does not hold a run config")
    return cfg


def method_of(cfg: dict) -> str:
    return cfg.get("search", {}).get("method", "evolution")


def criterion_of(cfg: dict) -> str:
    return cfg.get("supernet", {}).get("criterion", "tyr")


def planned_generations(cfg: dict) -> list[int]:
    """Generations per iteration as configured (one entry per iteration)."""
    return [int(g) for g in cfg.get("search", {}).get("generations", [])]


def is_one_shot(cfg: dict) -> bool:
    return method_of(cfg) in ONE_SHOT_METHODS


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is missing or unreadable (a run may be mid-write elsewhere)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_history(path: Path) -> list[dict]:
    """history.jsonl lines; a torn last line (killed mid-append) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def format_kl(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.5f}"


def run_status(run_dir: str | Path) -> list[str]:
    """Human-readable lines describing the progress of a run directory."""
    run = Path(run_dir)
    cfg = read_config(run)
    method = method_of(cfg)
    lines = [
        f"run {run}: {cfg.get('model', {}).get('name')} at sparsity {cfg.get('sparsity')} "
        f"(schedule {cfg.get('schedule')}, method {method}, criterion {criterion_of(cfg)})"
    ]
    teacher = (run / "teacher" / "meta.json").is_file()
    lines.append(f"  teacher targets: {'done' if teacher else 'pending'}")
    remaining_s = 0.0
    for i, total in enumerate(planned_generations(cfg), start=1):
        it_dir = run / f"iter-{i}"
        if i > 1 and is_one_shot(cfg) and not it_dir.exists():
            lines.append(f"  iteration {i}: not needed (method {method} is one-shot)")
            continue
        lines.append(_iteration_line(it_dir, i, total))
        remaining_s += _remaining_seconds(it_dir, total)
    metrics = read_json(run / "final" / "metrics.json")
    if metrics is not None:
        lines.append(_finished_line(metrics))
    elif remaining_s:
        lines.append(f"  search time left (supernet builds not included): about {remaining_s / 60:.0f} min")
    return lines


def _finished_line(m: dict) -> str:
    ppl = {name: m.get(name, {}).get("ppl") for name in ("dense", "uniform", "searched")}
    shown = ", ".join(f"{name} {'n/a' if v is None else f'{v:.2f}'}" for name, v in ppl.items())
    return f"  finished: perplexity {shown} (sparsity {m.get('achieved_sparsity', float('nan')):.3f})"


def _iteration_line(it_dir: Path, iteration: int, total: int) -> str:
    result = read_json(it_dir / "result.json")
    if result is not None:
        generations = result.get("generations", 0)
        one_shot = result.get("method") in ONE_SHOT_METHODS
        how = f"one-shot method {result['method']}" if one_shot else f"{generations} generations"
        return f"  iteration {iteration}: done ({how}, best KL {format_kl(result.get('fitness'))})"
    manifest = read_json(it_dir / "supernet" / "manifest.json")
    if manifest is None:
        return f"  iteration {iteration}: pending"
    state = read_json(it_dir / "search" / "state.json")
    history = read_history(it_dir / "search" / "history.jsonl")  # random/optuna keep no state.json
    if state is None and not history:
        return f"  iteration {iteration}: building the supernet ({len(manifest.get('genes', {}))} genes done)"
    if state is not None:
        generation, what, best = state.get("generation", 0), "parent", state.get("parent_fitness")
    else:
        fitness = [row["fitness"] for row in history if row.get("fitness") is not None]
        generation, what, best = len(history), "best", min(fitness, default=None)
    return f"  iteration {iteration}: searching, generation {generation}/{total}, {what} KL {format_kl(best)}"


def _remaining_seconds(it_dir: Path, total: int) -> float:
    if (it_dir / "result.json").is_file():
        return 0.0
    seconds = [
        float(row["seconds"]) for row in read_history(it_dir / "search" / "history.jsonl") if "seconds" in row
    ]
    return statistics.median(seconds) * max(total - len(seconds), 0) if seconds else 0.0
