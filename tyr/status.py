"""`tyr status RUN`: where a run stands (stage, generation, best fitness, ETA), read from its files only."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

from tyr.errors import TyrError


def run_status(run_dir: str | Path) -> list[str]:
    """Human-readable lines describing the progress of a run directory."""
    run = Path(run_dir)
    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise TyrError(f"{run} is not a Tyr run directory (no config.yaml)")
    cfg = yaml.safe_load(config_path.read_text())
    search = cfg.get("search", {})
    generations = search.get("generations", [])
    lines = [
        f"run {run}: {cfg['model']['name']} at sparsity {cfg['sparsity']} (schedule {cfg.get('schedule')})"
    ]
    teacher = (run / "teacher" / "meta.json").is_file()
    lines.append(f"  teacher targets: {'done' if teacher else 'pending'}")
    remaining_s = 0.0
    for i, total in enumerate(generations, start=1):
        lines.append(_iteration_line(run / f"iter-{i}", i, total))
        remaining_s += _remaining_seconds(run / f"iter-{i}", total)
    final = run / "final" / "metrics.json"
    if final.is_file():
        m = json.loads(final.read_text())
        lines.append(
            f"  finished: perplexity dense {m['dense']['ppl']:.2f}, uniform {m['uniform']['ppl']:.2f}, "
            f"searched {m['searched']['ppl']:.2f} (sparsity {m['achieved_sparsity']:.3f})"
        )
    elif remaining_s:
        lines.append(f"  search time left (supernet builds not included): about {remaining_s / 60:.0f} min")
    return lines


def _iteration_line(it_dir: Path, iteration: int, total: int) -> str:
    if (it_dir / "result.json").is_file():
        result = json.loads((it_dir / "result.json").read_text())
        return f"  iteration {iteration}: done ({result['generations']} generations, best KL {result['fitness']:.5f})"
    manifest = it_dir / "supernet" / "manifest.json"
    if not manifest.is_file():
        return f"  iteration {iteration}: pending"
    genes = json.loads(manifest.read_text()).get("genes", {})
    state = it_dir / "search" / "state.json"
    if not state.is_file():
        return f"  iteration {iteration}: building the supernet ({len(genes)} genes done)"
    s = json.loads(state.read_text())
    return (
        f"  iteration {iteration}: searching, generation {s['generation']}/{total}, "
        f"parent KL {s['parent_fitness']}"
    )


def _remaining_seconds(it_dir: Path, total: int) -> float:
    if (it_dir / "result.json").is_file():
        return 0.0
    history = it_dir / "search" / "history.jsonl"
    seconds = []
    if history.is_file():
        for line in history.read_text().splitlines():
            try:
                seconds.append(float(json.loads(line)["seconds"]))
            except (ValueError, KeyError):
                continue
    return statistics.median(seconds) * (total - len(seconds)) if seconds else 0.0
