"""Compare allocation methods and local pruning criteria on SmolLM2-135M under the same budget.

Every row is a full `tyr run` (teacher, supernet, allocation, final held-out metrics) with the `cpu` schedule
(the demo's: 32x512 calibration tokens of lee-background, 2 iterations of 6 + 4 generations, 16 offspring,
top-512 KL) at one sparsity, with one `search.method` and one `supernet.criterion`. Runs of the same
(sparsity, criterion) share the teacher targets and iteration 1's supernet (hard links), as they would be
identical; the run that built them is listed first and its wall time includes the build.

Grids: `cross` (default) = `methods` (every method with the tyr criterion) + `criteria` (uniform and evolution
for every other criterion); `full` = every method x every criterion; `criteria-uniform` = the other criteria
with the uniform allocation only.

    python -m benchmarks.compare [--sparsities 0.5,0.25] [--grid cross|full] [--out runs/compare] [--set k=v ...]
    python -m benchmarks.compare --table     # rewrite compare.md from compare.json, run nothing

Writes benchmarks/results/compare.json (rows of earlier invocations with other keys are kept) and compare.md
(markdown table). Re-running resumes finished runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.common import RESULTS, markdown_table, write_results
from tyr.config import dump_yaml, resolve_config
from tyr.methods import METHODS as ALL_METHODS
from tyr.run import run
from tyr.rundir import RunDir
from tyr.supernet.criteria import CRITERIA as ALL_CRITERIA

# uniform first: the quickest run of a criterion builds the supernet its other methods share
METHODS = ("uniform", *(m for m in ALL_METHODS if m != "uniform"))
CRITERIA = tuple(ALL_CRITERIA)  # the default, tyr, first


def grid(kind: str) -> list[tuple[str, str]]:
    """(criterion, method) pairs; the first of each criterion (uniform, the quickest) builds the shared supernet."""
    methods = [("tyr", m) for m in METHODS]
    criteria = [(c, m) for c in CRITERIA[1:] for m in ("uniform", "evolution")]
    grids = {
        "full": [(c, m) for c in CRITERIA for m in METHODS],
        "cross": methods + criteria,
        "methods": methods,
        "criteria": criteria,
        "criteria-uniform": [(c, "uniform") for c in CRITERIA[1:]],
    }
    return grids[kind]


def share_from(donor: Path, run_dir: Path) -> None:
    """Hard-link the donor's teacher targets and iteration-1 supernet (files are only ever replaced whole)."""
    donor_run, run = RunDir(donor), RunDir(run_dir)
    for src, dst in (
        (donor_run.teacher_dir, run.teacher_dir),
        (donor_run.supernet_dir(1), run.supernet_dir(1)),
    ):
        if not src.is_dir() or dst.exists():
            continue
        for path in sorted(src.rglob("*")):
            target = dst / path.relative_to(src)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)


def one_run(
    sparsity: float, criterion: str, method: str, out: Path, donor: Path | None, extra: list[str]
) -> dict:
    cfg = resolve_config(
        None,
        [
            "schedule=cpu",
            f"sparsity={sparsity}",
            f"search.method={method}",
            f"supernet.criterion={criterion}",
            *extra,
        ],
    )
    run_dir = out / f"s{int(round(sparsity * 100))}-{criterion}-{method}"
    timing_path = run_dir / "benchmark_seconds.json"
    rd = RunDir(run_dir)
    if rd.is_finished() and timing_path.is_file():  # finished earlier: report it as it was measured
        metrics = rd.read_metrics()
        seconds = json.loads(timing_path.read_text())["seconds"]
    else:
        identity = dump_yaml(cfg)
        rd.open(identity, rd.check_open(identity, force=False))
        if donor is not None:
            share_from(donor, run_dir)
        t0 = time.perf_counter()
        metrics = run(cfg, run_dir, progress=False)
        seconds = time.perf_counter() - t0
        timing_path.write_text(json.dumps({"seconds": seconds}))
    return {
        "sparsity": sparsity,
        "criterion": criterion,
        "method": method,
        "ppl": metrics["searched"]["ppl"],
        "kl": metrics["searched"]["kl"],
        "dense_ppl": metrics["dense"]["ppl"],
        "achieved_sparsity": metrics["achieved_sparsity"],
        "evaluations": metrics.get("evaluations", 0),
        "seconds": seconds,
        "built_supernet": donor is None,
        "run_dir": str(run_dir),
    }


def table(rows: list[dict]) -> str:
    headers = [
        "sparsity",
        "criterion",
        "method",
        "held-out ppl",
        "KL",
        "param sparsity",
        "evaluations",
        "wall s",
    ]
    body = [
        [
            f"{r['sparsity']:.0%}",
            r["criterion"],
            r["method"],
            f"{r['ppl']:.2f}",
            f"{r['kl']:.4f}",
            f"{r['achieved_sparsity']:.3f}",
            r["evaluations"],
            f"{r['seconds']:.0f}" + ("*" if r["built_supernet"] else ""),
        ]
        for r in rows
    ]
    return markdown_table(headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparsities", default="0.5,0.25")
    parser.add_argument(
        "--grid", choices=("cross", "full", "methods", "criteria", "criteria-uniform"), default="cross"
    )
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--table", action="store_true", help="only rewrite compare.md from compare.json")
    args = parser.parse_args()
    if args.table:
        write_table(_load_rows())
        return
    out = Path(args.out)
    rows = _load_rows()
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        donors: dict[str, Path] = {}
        for criterion, method in grid(args.grid):
            print(f"[compare] sparsity {sparsity} criterion {criterion} method {method}", flush=True)
            row = one_run(sparsity, criterion, method, out, donors.get(criterion), args.overrides)
            donors.setdefault(criterion, Path(row["run_dir"]))
            rows = [r for r in rows if _key(r) != _key(row)] + [row]
            dense = row["dense_ppl"]
            print(
                f"[compare] -> ppl {row['ppl']:.2f} (dense {dense:.2f}), {row['seconds']:.0f} s", flush=True
            )
            payload = {"setting": "cpu schedule, SmolLM2-135M, eval lee", "grid": args.grid, "rows": rows}
            write_results("compare", payload)
    write_table(rows)


def _key(row: dict) -> tuple:
    return row["sparsity"], row["criterion"], row["method"]


def _load_rows() -> list[dict]:
    path = RESULTS / "compare.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def write_table(rows: list[dict]) -> None:
    order = {(c, m): i for i, (c, m) in enumerate(grid("full"))}
    rows = sorted(rows, key=lambda r: (-r["sparsity"], order[(r["criterion"], r["method"])]))
    text = table(rows)
    (RESULTS / "compare.md").write_text(
        text
        + "\n\n*: this run built the teacher targets and iteration 1's supernet that the other runs of its "
        "sparsity and criterion reuse, so its wall time includes the build.\n"
    )
    print(text)


if __name__ == "__main__":
    main()
