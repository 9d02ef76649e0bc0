"""`tyr status RUN`: where a run stands (stage, generation, best fitness, ETA), read from its files only.

The run's files are read as plain data through `tyr.rundir.RunDir` (never through the typed config), so a run
written by an older or newer Tyr still reads. `run_progress` is the structured answer (`tyr status --json`);
`run_status` the human one.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tyr.errors import TyrError
from tyr.methods import is_one_shot as _method_is_one_shot
from tyr.rundir import RunDir, read_json_object


def section(cfg: dict, name: str) -> dict:
    """A config section as a dict ({} when missing or malformed: a run of another Tyr still reads)."""
    value = cfg.get(name)
    return value if isinstance(value, dict) else {}


def method_of(cfg: dict) -> str:
    return str(section(cfg, "search").get("method", "evolution"))


def criterion_of(cfg: dict) -> str:
    return str(section(cfg, "supernet").get("criterion", "tyr"))


def planned_generations(cfg: dict) -> list[int]:
    """Generations per iteration as configured (one entry per iteration)."""
    generations = section(cfg, "search").get("generations", [])
    if not isinstance(generations, list) or not all(isinstance(g, int) for g in generations):
        raise TyrError(f"search.generations in the run's config.yaml is malformed: {generations!r}")
    return generations


def unreadable(run: RunDir, error: Exception) -> TyrError:
    """What `tyr status`/`tyr report` say when a run's files hold values of the wrong type."""
    return TyrError(
        f"{run.path} holds a file with malformed values ({type(error).__name__}: {error}); it was damaged or "
        "written by another Tyr version — re-run `tyr run` on it to rewrite the run's files"
    )


def is_one_shot(cfg: dict) -> bool:
    return _method_is_one_shot(method_of(cfg))


def format_kl(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.5f}"


@dataclass
class IterationProgress:
    iteration: int
    stage: str  # pending | building | searching | done | not needed
    generation: int = 0  # generations (or sampler batches) done
    generations: int = 0  # planned
    best_fitness: float | None = None
    genes_built: int = 0
    eta_s: float | None = None  # search time left in this iteration (median s/generation x generations left)
    # with validation windows: the result's validation KL (while searching: the best measured so far), and the
    # start genome's
    validation_kl: float | None = None
    start_validation_kl: float | None = None


@dataclass
class RunProgress:
    """`tyr status --json`: the run's stage and, while it searches, the current iteration's numbers."""

    run: str
    model: str | None
    sparsity: float | None
    method: str
    criterion: str
    stage: str  # teacher | building | searching | final | finished
    iteration: int | None
    generation: int | None
    best_fitness: float | None
    eta_s: float | None  # search time left over all iterations (supernet builds not included)
    finished: bool
    iterations: list[IterationProgress] = field(default_factory=list)
    metrics: dict | None = None
    # the final model's iteration and validation KL (final/selection.json; None before it exists)
    selected_iteration: int | None = None
    selected_validation_kl: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def run_progress(run_dir: str | Path) -> RunProgress:
    """Structured progress of a run directory (TyrError when it is not one)."""
    run = RunDir(run_dir)
    try:
        return _progress(run)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise unreadable(run, e) from None


def _progress(run: RunDir) -> RunProgress:
    cfg = run.read_config()
    iterations = [
        _iteration_progress(run, cfg, i, total) for i, total in enumerate(planned_generations(cfg), start=1)
    ]
    metrics = run.read_metrics()
    active = [it for it in iterations if it.stage in ("building", "searching")]
    current = active[0] if active else None
    if metrics is not None:
        stage = "finished"
    elif not run.has_teacher():
        stage = "teacher"
    elif current is not None:
        stage = current.stage
    elif any(it.stage == "pending" for it in iterations):
        stage = "building"
    else:
        stage = "final"
    etas = [it.eta_s for it in iterations if it.eta_s is not None]
    done = [it for it in iterations if it.stage == "done"]
    latest = current or (done[-1] if done else None)
    selection = read_json_object(run.selection_path) or {}
    return RunProgress(
        run=str(run.path),
        model=section(cfg, "model").get("name"),
        sparsity=cfg.get("sparsity"),
        method=method_of(cfg),
        criterion=criterion_of(cfg),
        stage=stage,
        iteration=latest.iteration if latest else None,
        generation=latest.generation if latest else None,
        best_fitness=latest.best_fitness if latest else None,
        eta_s=sum(etas) if etas and metrics is None else (0.0 if metrics is not None else None),
        finished=metrics is not None,
        iterations=iterations,
        metrics=metrics,
        selected_iteration=selection.get("iteration"),
        selected_validation_kl=selection.get("validation_kl"),
    )


def _iteration_progress(run: RunDir, cfg: dict, iteration: int, total: int) -> IterationProgress:
    if is_one_shot(cfg):
        total = 0
        if iteration > 1 and not run.iteration_dir(iteration).exists():
            return IterationProgress(iteration, "not needed")
    result = run.read_result(iteration)
    history = run.read_history(iteration)
    if result is not None:
        return IterationProgress(
            iteration,
            "done",
            generation=int(result.get("generations", 0)),
            generations=total,
            best_fitness=result.get("fitness"),
            eta_s=0.0,
            validation_kl=result.get("validation_kl"),
            start_validation_kl=result.get("start_validation_kl"),
        )
    manifest = run.read_manifest(iteration)
    if manifest is None:
        return IterationProgress(iteration, "pending", generations=total)
    state = run.read_state(iteration)  # random/optuna keep no state.json, only their history
    if state is None and not history:
        return IterationProgress(
            iteration, "building", generations=total, genes_built=len(manifest.get("genes", {}))
        )
    if state is not None:
        generation, best = int(state.get("generation", 0)), state.get("parent_fitness")
    else:
        fitness = [row["fitness"] for row in history if row.get("fitness") is not None]
        generation, best = len(history), min(fitness, default=None)
    seconds = [float(row["seconds"]) for row in history if "seconds" in row]
    eta = statistics.median(seconds) * max(total - len(seconds), 0) if seconds else None
    start_kl, best_kl = searched_validation(state, history)
    return IterationProgress(
        iteration,
        "searching",
        generation,
        total,
        best,
        len(manifest.get("genes", {})),
        eta,
        validation_kl=best_kl,
        start_validation_kl=start_kl,
    )


def searched_validation(state: dict | None, history: list[dict]) -> tuple[float | None, float | None]:
    """(start genome's, best so far) validation KL of a search in progress, from its state and history."""
    start = ((state or {}).get("start_validated") or {}).get("validation_kl")
    measured = [row["validation_kl"] for row in history if row.get("validation_kl") is not None]
    if start is not None:
        measured.append(start)
    return start, min(measured, default=None)


def run_status(run_dir: str | Path) -> list[str]:
    """Human-readable lines describing the progress of a run directory."""
    progress = run_progress(run_dir)
    try:
        return _status_lines(progress, RunDir(run_dir).read_config())
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise unreadable(RunDir(run_dir), e) from None


def _status_lines(progress: RunProgress, cfg: dict) -> list[str]:
    lines = [
        f"run {progress.run}: {progress.model} at sparsity {progress.sparsity} "
        f"(schedule {cfg.get('schedule')}, method {progress.method}, criterion {progress.criterion})",
        f"  teacher targets: {'pending' if progress.stage == 'teacher' else 'done'}",
    ]
    for it in progress.iterations:
        lines.append(_iteration_line(it, progress.method))
    if progress.metrics is not None:
        lines.append(_finished_line(progress.metrics))
        if progress.selected_validation_kl is not None:
            lines.append(
                f"  final model: iteration {progress.selected_iteration}'s result "
                f"(the best validation KL, {format_kl(progress.selected_validation_kl)})"
            )
    elif progress.eta_s:
        lines.append(
            f"  search time left (supernet builds not included): about {progress.eta_s / 60:.0f} min"
        )
    return lines


def _iteration_line(it: IterationProgress, method: str) -> str:
    head = f"  iteration {it.iteration}:"
    if it.stage == "not needed":
        return f"{head} not needed (method {method} is one-shot)"
    validation = "" if it.validation_kl is None else f", validation KL {format_kl(it.validation_kl)}"
    if it.stage == "done":
        how = f"one-shot method {method}" if _method_is_one_shot(method) else f"{it.generation} generations"
        return f"{head} done ({how}, best KL {format_kl(it.best_fitness)}{validation})"
    if it.stage == "pending":
        return f"{head} pending"
    if it.stage == "building":
        return f"{head} building the supernet ({it.genes_built} genes done)"
    return (
        f"{head} searching, generation {it.generation}/{it.generations}, best KL {format_kl(it.best_fitness)}"
        + validation
    )


def _finished_line(m: dict) -> str:
    ppl = {name: (m.get(name) or {}).get("ppl") for name in ("dense", "uniform", "searched")}
    shown = ", ".join(f"{name} {'n/a' if v is None else f'{v:.2f}'}" for name, v in ppl.items())
    return f"  finished: perplexity {shown} (sparsity {m.get('achieved_sparsity', float('nan')):.3f})"
