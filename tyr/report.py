"""`tyr report RUN`: a Markdown summary of a run directory plus PNG plots, read from the run's files only.

Writes OUT/report.md, OUT/plots/allocation.png (kept heads / MLP channels per layer, searched vs uniform) and
OUT/plots/fitness.png (best KL per generation, one line per iteration). Works on an unfinished or interrupted
run: it reports what exists and lists what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from tyr.errors import TyrError
from tyr.export.card import markdown_escape
from tyr.io import atomic_write_bytes, atomic_write_text
from tyr.rundir import RunDir, check_folder_link, read_json_object
from tyr.status import (
    criterion_of,
    format_kl,
    is_one_shot,
    method_of,
    planned_generations,
    searched_validation,
    section,
    unreadable,
)

KINDS = ("attn", "mlp")
STAMP = "<!-- written by tyr report -->"  # report.md's first line: what `tyr report --out` may overwrite


@dataclass
class Iteration:
    """What one iteration directory holds."""

    index: int
    planned_generations: int
    status: str  # done | searching | building the supernet | pending | not needed (...)
    result: dict | None = None
    state: dict | None = None
    history: list[dict] = field(default_factory=list)

    @property
    def generations_done(self) -> int:
        if self.result is not None:
            return int(self.result.get("generations", 0))
        return int(self.state.get("generation", 0)) if self.state else len(self.history)

    @property
    def evaluations(self) -> int:
        if self.result is not None and "evaluations" in self.result:
            return int(self.result["evaluations"])
        return sum(int(row.get("num_evaluations", 0)) for row in self.history)

    @property
    def best_fitness(self) -> float | None:
        """The result's fitness; while searching, the parent's (or the best line of the history)."""
        if self.result is not None:
            return self.result.get("fitness")
        if self.state and self.state.get("parent_fitness") is not None:
            return self.state["parent_fitness"]
        values = [row["fitness"] for row in self.history if row.get("fitness") is not None]
        return min(values, default=None)

    @property
    def validation_kl(self) -> float | None:
        """The result's validation KL; while searching, the best measured so far (None without validation)."""
        if self.result is not None:
            return self.result.get("validation_kl")
        return searched_validation(self.state, self.history)[1]

    @property
    def seconds(self) -> float:
        return sum(float(row.get("seconds", 0.0)) for row in self.history)


@dataclass
class RunFiles:
    """A run directory's files, parsed; None / empty where a file does not exist (yet)."""

    run: RunDir
    config: dict
    teacher: bool
    units: dict[tuple[int, str], tuple[int, int]]  # (layer, kind) -> (num_units, centre_removed), iteration 1
    iterations: list[Iteration]
    architecture: dict | None
    metrics: dict | None
    selection: dict | None = None  # final/selection.json

    @property
    def finished(self) -> bool:
        return self.metrics is not None and self.architecture is not None


@dataclass
class Allocation:
    """Kept units per layer: uniform (iteration 1's centre) and chosen (final, or the latest iteration)."""

    num_layers: int
    total: dict[str, list[int | None]]  # kind -> units per layer in the dense model
    uniform: dict[str, list[int | None]]
    chosen: dict[str, list[int | None]] | None
    chosen_label: str
    kept_kv_heads: list[int] | None = None


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write OUT/report.md and OUT/plots/*.png for `run_dir` (OUT defaults to the run directory)."""
    _require_matplotlib()  # fail before writing anything
    try:
        return _write_report(Path(run_dir), out)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise unreadable(RunDir(run_dir), e) from None


def _write_report(run_dir: Path, out: str | Path | None) -> Path:
    files = load_run(run_dir)
    out_dir = Path(out) if out is not None else files.run.path
    _check_output(out_dir, files.run)
    alloc = allocation(files)
    plots: dict[str, str] = {}
    if alloc is not None:
        atomic_write_bytes(out_dir / "plots" / "allocation.png", plot_allocation(alloc))
        plots["allocation"] = "plots/allocation.png"
    fitness_png = plot_fitness(files.iterations)
    if fitness_png is not None:
        atomic_write_bytes(out_dir / "plots" / "fitness.png", fitness_png)
        plots["fitness"] = "plots/fitness.png"
    path = out_dir / "report.md"
    atomic_write_text(path, render_markdown(files, alloc, plots))
    return path


def _check_output(out_dir: Path, run: RunDir) -> None:
    """Overwrite only what `tyr report` wrote: a report.md it stamped, plots/ beside it, never a linked plots/
    folder that points at someone else's files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TyrError(f"--out {out_dir} is a file, not a folder")
    check_folder_link(out_dir / "plots")
    if out_dir.resolve() == run.path.resolve():
        return  # the run's own report (reports of older Tyr versions carry no stamp)
    report = out_dir / "report.md"
    stamped = report.is_file() and report.read_text(errors="replace").startswith(STAMP)
    foreign = (report, out_dir / "plots" / "allocation.png", out_dir / "plots" / "fitness.png")
    if not stamped and any(p.exists() for p in foreign):
        raise TyrError(
            f"{out_dir} already holds a report.md or plots that `tyr report` did not write; choose another --out"
        )


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise TyrError("tyr report needs matplotlib: pip install 'tyr-pruner[report]'") from None


# ---- reading -------------------------------------------------------------------------------------


def load_run(run_dir: Path) -> RunFiles:
    """Parse whatever a run directory holds; TyrError when it is not a run directory."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    manifest = run.read_manifest(1)
    return RunFiles(
        run=run,
        config=cfg,
        teacher=run.has_teacher(),
        units=_gene_units(manifest) if isinstance(manifest, dict) else {},
        iterations=[_iteration(run, cfg, i, n) for i, n in enumerate(planned_generations(cfg), start=1)],
        architecture=run.read_architecture(),
        metrics=run.read_metrics(),
        selection=read_json_object(run.selection_path),
    )


def _gene_units(manifest: dict) -> dict[tuple[int, str], tuple[int, int]]:
    """(num_units, centre_removed) per gene; the fingerprint lists every gene even mid-build."""
    units = {}
    for name, num_units, centre_removed, *_ in manifest.get("fingerprint", {}).get("ladders", []):
        layer, kind = name.split(".")
        units[(int(layer), kind)] = (int(num_units), int(centre_removed))
    for gene in manifest.get("genes", {}).values():
        units[(int(gene["layer"]), gene["kind"])] = (int(gene["num_units"]), int(gene["centre_removed"]))
    return units


def _iteration(run: RunDir, cfg: dict, index: int, planned: int) -> Iteration:
    if is_one_shot(cfg):
        planned = 0  # one-shot methods pick their allocation without generations
        if index > 1 and not run.iteration_dir(index).exists():
            return Iteration(index, planned, f"not needed (method {method_of(cfg)} is one-shot)")
    it = Iteration(
        index,
        planned,
        "pending",
        result=run.read_result(index),
        state=run.read_state(index),
        history=run.read_history(index),
    )
    if it.result is not None:
        it.status = "done"
    elif it.state is not None or it.history:
        it.status = "searching"
    elif run.manifest_path(index).is_file():
        it.status = "building the supernet"
    return it


def missing_items(files: RunFiles) -> list[str]:
    """What an unfinished run still lacks, in pipeline order."""
    run = files.run
    items = [] if files.teacher else [f"teacher targets ({run.relative(run.teacher_dir / 'meta.json')})"]
    for it in files.iterations:
        if it.status != "done" and not it.status.startswith("not needed"):
            items.append(
                f"iteration {it.index} result ({run.relative(run.result_path(it.index))}; {it.status})"
            )
    for name, path in (("architecture", run.architecture_path), ("metrics", run.metrics_path)):
        if getattr(files, name) is None:
            items.append(f"final {name} ({run.relative(path)})")
    return items


# ---- allocation ----------------------------------------------------------------------------------


def allocation(files: RunFiles) -> Allocation | None:
    """Per-layer kept units, or None when iteration 1's supernet manifest does not exist yet."""
    if not files.units:
        return None
    layers = [layer for layer, _ in files.units]
    if files.architecture is not None:
        layers += [entry["index"] for entry in files.architecture.get("layers", [])]
    num_layers = max(layers) + 1
    total = {k: [files.units.get((i, k), (None, 0))[0] for i in range(num_layers)] for k in KINDS}
    uniform = {k: [_kept(files.units.get((i, k))) for i in range(num_layers)] for k in KINDS}
    alloc = Allocation(num_layers, total, uniform, None, "")
    if files.architecture is not None:
        _chosen_from_architecture(alloc, files.architecture)
    else:
        _chosen_from_latest_result(alloc, files)
    return alloc


def _kept(units: tuple[int, int] | None) -> int | None:
    return None if units is None else units[0] - units[1]


def _chosen_from_architecture(alloc: Allocation, architecture: dict) -> None:
    chosen: dict[str, list[int | None]] = {k: [None] * alloc.num_layers for k in KINDS}
    kv: list[int] = [0] * alloc.num_layers
    for entry in architecture.get("layers", []):
        i = entry["index"]
        chosen["attn"][i] = len(entry["attention"]["kept_heads"])
        kv[i] = len(entry["attention"]["kept_kv_heads"])
        chosen["mlp"][i] = entry["mlp"]["kept_channels_count"]
    alloc.chosen, alloc.kept_kv_heads, alloc.chosen_label = chosen, kv, "searched (final)"


def _chosen_from_latest_result(alloc: Allocation, files: RunFiles) -> None:
    """An unfinished run: the latest finished iteration's allocation (its `centres` = units removed per gene), or
    with validation the best-validating one (what the final model would be now)."""
    done = [it for it in files.iterations if it.result is not None and "centres" in it.result]
    if not done:
        return
    latest = done[-1]
    if all(it.validation_kl is not None for it in done):  # monotone coarse to fine: the best result so far
        latest = min(done, key=lambda it: it.validation_kl)
    chosen: dict[str, list[int | None]] = {k: [None] * alloc.num_layers for k in KINDS}
    genes = [(layer, kind) for layer in range(alloc.num_layers) for kind in KINDS]  # genome order
    for (layer, kind), removed in zip(genes, latest.result["centres"]):
        total = alloc.total[kind][layer]
        chosen[kind][layer] = None if total is None else total - int(removed)
    alloc.chosen, alloc.chosen_label = chosen, f"iteration {latest.index} result (run unfinished)"


# ---- plots ---------------------------------------------------------------------------------------


def plot_allocation(alloc: Allocation) -> bytes:
    """Two panels (attention heads, MLP channels): kept units per layer, uniform vs chosen."""
    fig = _figure(figsize=(10, 6.5))
    axes = fig.subplots(2, 1, sharex=True)
    x = list(range(alloc.num_layers))
    titles = {"attn": "kept attention (query) heads", "mlp": "kept MLP channels"}
    for ax, kind in zip(axes, KINDS):
        width = 0.4 if alloc.chosen is not None else 0.8
        left = [i - width / 2 for i in x] if alloc.chosen is not None else x
        ax.bar(left, _nan(alloc.uniform[kind]), width, label="uniform (iteration 1 centre)", color="0.7")
        if alloc.chosen is not None:
            ax.bar([i + width / 2 for i in x], _nan(alloc.chosen[kind]), width, label=alloc.chosen_label)
        dense = max((t for t in alloc.total[kind] if t is not None), default=None)
        if dense is not None:
            ax.axhline(dense, color="0.3", linestyle=":", linewidth=1, label=f"dense ({dense})")
            ax.set_ylim(0, dense * 1.3)  # headroom for the legend above the bars
        ax.set_title(titles[kind])
        ax.set_ylabel("units kept")
        ax.legend(loc="upper center", ncols=3, fontsize="small")
    axes[-1].set_xlabel("layer")
    _integer_ticks(axes[-1].xaxis)
    return _png(fig)


def plot_fitness(iterations: list[Iteration]) -> bytes | None:
    """Best fitness per generation, one line per iteration on a cumulative generation axis; None if no data."""
    series = []
    offset = 0
    for it in iterations:
        generations = [int(row.get("generation", n)) for n, row in enumerate(it.history, start=1)]
        points = [
            (offset + g, row["fitness"])
            for g, row in zip(generations, it.history)
            if row.get("fitness") is not None
        ]
        if points:
            series.append((it.index, offset, points))
        offset += max(generations) if generations else it.generations_done
    if not series:
        return None
    fig = _figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for index, start, points in series:
        if start:
            ax.axvline(start + 0.5, color="0.8", linewidth=1)
        ax.plot(*zip(*points), marker="o", markersize=3, label=f"iteration {index}")
    ax.set_xlabel("generation (cumulative over iterations)")
    ax.set_ylabel("best KL to dense")
    ax.set_title("search fitness (each generation is scored on fresh calibration batches)")
    _integer_ticks(ax.xaxis)
    ax.legend(fontsize="small")
    return _png(fig)


def _figure(figsize: tuple[float, float]):
    """A Figure on an Agg canvas: no display and no pyplot global state (safe in any process)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _nan(values: list[int | None]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def _png(fig) -> bytes:
    buffer = BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# ---- markdown ------------------------------------------------------------------------------------


def render_markdown(files: RunFiles, alloc: Allocation | None, plots: dict[str, str]) -> str:
    """The whole report.md, section by section."""
    sections = [
        STAMP + "\n"
        f"# Tyr run report: {markdown_escape(files.run.path.name or files.run.path)}\n\n"
        + (
            "Run finished."
            if files.finished
            else "**Run not finished**: this report shows what exists so far."
        ),
        _summary(files),
        _missing(files),
        _metrics(files.metrics),
        _iterations(files, plots.get("fitness")),
        _allocation(alloc, plots.get("allocation"), files.run),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; every cell is escaped (values come from run files, which may hold anything)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(markdown_escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _summary(files: RunFiles) -> str:
    cfg, arch = files.config, files.architecture or {}
    data = section(cfg, "data")
    model_type = f" ({arch['model_type']})" if "model_type" in arch else ""
    achieved = arch.get("achieved_sparsity", (files.metrics or {}).get("achieved_sparsity"))
    rows = [
        ["model", f"{arch.get('base_model', section(cfg, 'model').get('name'))}" + model_type],
        ["target sparsity", f"{cfg.get('sparsity')}"],
        ["achieved sparsity (prunable parameters)", "n/a" if achieved is None else f"{achieved:.4f}"],
        ["method", (files.metrics or {}).get("method", method_of(cfg))],
        ["criterion", (files.metrics or {}).get("criterion", criterion_of(cfg))],
        ["schedule", f"{cfg.get('schedule')}"],
        [
            "calibration",
            f"{data.get('calibration')}, {data.get('num_sequences')} × {data.get('seq_len')} tokens",
        ],
        ["seed", f"{cfg.get('seed')}"],
    ]
    validation = section(cfg, "data").get("num_validation_sequences") or 0
    if validation:
        rows.append(["validation", f"{validation} × {data.get('seq_len')} tokens (held out of calibration)"])
    selection = files.selection or {}
    if selection.get("validation_kl") is not None:
        rows.append(
            [
                "final model",
                f"iteration {selection.get('iteration')}'s result (best validation KL "
                f"{format_kl(selection['validation_kl'])})",
            ]
        )
    params = arch.get("params")
    if params:
        ratio = params["pruned"] / params["dense"]
        rows.append(
            ["parameters", f"{_count(params['dense'])} dense → {_count(params['pruned'])} ({ratio:.1%})"]
        )
        rows.append(
            [
                "prunable parameters",
                f"{_count(params['prunable_dense'])} → {_count(params['prunable_pruned'])}",
            ]
        )
    return "## Summary\n\n" + _table(["setting", "value"], rows)


def _missing(files: RunFiles) -> str:
    items = missing_items(files)
    if not items:
        return ""
    return "## Missing\n\n" + "\n".join(f"- {markdown_escape(item)}" for item in items)


def _metrics(metrics: dict | None) -> str:
    if metrics is None:
        return "## Held-out metrics\n\nNot measured yet (final metrics are missing)."
    rows = []
    for name in ("dense", "uniform", "searched"):
        m = metrics.get(name)
        if m is None:
            continue
        params = m.get("prunable_params")
        rows.append(
            [name, _float(m.get("ppl"), 2), _float(m.get("kl"), 4), "—" if params is None else _count(params)]
        )
    header = ["model", "perplexity", f"KL to dense (top-{metrics.get('topk')})", "prunable parameters"]
    where = markdown_escape(f"{metrics.get('eval_data')}, {metrics.get('eval_tokens')} tokens")
    return f"## Held-out metrics\n\nEvaluation data: {where}.\n\n" + _table(header, rows)


def _iterations(files: RunFiles, fitness_plot: str | None) -> str:
    rows = []
    sampled = method_of(files.config) in ("random", "optuna")  # history lines are batches of trials
    for it in files.iterations:
        if it.status.startswith("not needed"):
            rows.append([str(it.index), it.status, "—", "—", "—", "—", "—"])
            continue
        status = it.status if it.status != "searching" else f"searching (generation {it.generations_done})"
        rows.append(
            [
                str(it.index),
                status,
                f"{it.generations_done} batches"
                if sampled
                else f"{it.generations_done} / {it.planned_generations}",
                str(it.evaluations),
                format_kl(it.best_fitness),
                "—" if it.validation_kl is None else format_kl(it.validation_kl),
                _duration(it.seconds),
            ]
        )
    steps = "trial batches" if sampled else "generations"
    header = ["iteration", "status", steps, "evaluations", "best KL", "validation KL", "search wall time"]
    text = "## Iterations\n\n" + _table(header, rows)
    if any(it.validation_kl is not None for it in files.iterations):
        text += (
            "\n\nValidation KL: of each iteration's result on the held-out validation windows (while searching:"
            " the best measured so far). The result is the best-validating genome measured in the iteration, and"
            " the final model the best-validating result."
        )
    if fitness_plot:
        text += (
            "\n\nBest KL is measured on random calibration batches (fresh ones in every selection stage), so it"
            " is noisy from generation to generation; the held-out metrics are the numbers to compare."
            f"\n\n![best fitness per generation]({fitness_plot})"
        )
    else:
        text += "\n\nNo fitness plot: no search history with a fitness yet."
    return text


def _allocation(alloc: Allocation | None, plot: str | None, run: RunDir) -> str:
    if alloc is None:
        return f"## Allocation\n\nNo allocation yet ({run.relative(run.manifest_path(1))} is missing)."
    text = "## Allocation\n\n"
    if plot:
        text += f"![kept units per layer]({plot})\n\n"
    if alloc.chosen is None:
        text += "No iteration has finished yet; only the uniform allocation is known.\n\n"
    header = ["layer", "heads uniform", "heads chosen", "KV heads chosen", "MLP uniform", "MLP chosen"]
    rows = []
    for i in range(alloc.num_layers):
        chosen = alloc.chosen or {k: [None] * alloc.num_layers for k in KINDS}
        kv = "—" if alloc.kept_kv_heads is None else str(alloc.kept_kv_heads[i])
        rows.append(
            [
                str(i),
                _of(alloc.uniform["attn"][i], alloc.total["attn"][i]),
                _of(chosen["attn"][i], alloc.total["attn"][i]),
                kv,
                _of(alloc.uniform["mlp"][i], alloc.total["mlp"][i]),
                _of(chosen["mlp"][i], alloc.total["mlp"][i]),
            ]
        )
    label = f"Chosen = {alloc.chosen_label}." if alloc.chosen is not None else ""
    return text + _table(header, rows) + (f"\n\n{label}" if label else "")


def _of(kept: int | None, total: int | None) -> str:
    return "—" if kept is None else f"{kept} / {total}"


def _float(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n:,}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
