"""The data-parallel supernet build on a local Ray against the serial build, on the real model.

Uses a run directory with kept calibration windows, by default the demo's `runs/demo` (`make demo`): its config
and windows. Builds iteration 1's supernet (uniform centres) serially in this process, then on 1 and 2 local Ray
workers (tyr/cluster_build.py), each into a fresh folder, and compares every variant with the serial one: the
files' bytes, the kept units, the largest relative difference of the re-fitted weights. One worker must give the
serial bytes; more workers sum each gene's Hessian in another grouping (float32 rounding), which can flip a
near-tie between two units (counted here). Wall times on this machine are printed too; with 2 cores and
workers of 1 thread each, they say what the data-parallel build costs in overhead, not what it gains on GPUs
(docs/ray.md models that).

    python -m benchmarks.ray_build [--run runs/demo] [--workers 1,2]

Prints a table and writes `benchmarks/results/ray_build.json`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, write_results  # noqa: E402
from tyr import pipeline  # noqa: E402
from tyr.config import RunConfig, from_dict  # noqa: E402
from tyr.data import load_tokens  # noqa: E402
from tyr.rundir import RunDir  # noqa: E402
from tyr.supernet.store import SupernetStore  # noqa: E402
from tyr.supernet.variant import genes_of  # noqa: E402


def compare(reference: SupernetStore, other: SupernetStore) -> dict:
    """Variant by variant: identical files, kept units that differ, the largest relative weight difference."""
    files = same_files = units_differ = 0
    worst = 0.0
    for gene in reference.genes():
        for entry in reference.level_entries(gene):
            a, b = reference.variant(gene, entry.level), other.variant(gene, entry.level)
            files += 1
            same_files += entry.sha256 == other.level_entry(gene, entry.level).sha256
            if not torch.equal(a.kept, b.kept):
                units_differ += 1
                continue
            scale = float(a.weight.double().norm()) or 1.0
            worst = max(worst, float((a.weight.double() - b.weight.double()).norm()) / scale)
    return {
        "variants": files,
        "identical_files": same_files,
        "variants_with_other_units": units_differ,
        "max_relative_weight_difference": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", default="runs/demo", help="a run directory with kept windows (runs/demo)")
    parser.add_argument("--workers", default="1,2", help="worker counts to build with (1,2)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the serial build and of each worker (1)"
    )
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    run = RunDir(args.run)
    cfg = from_dict(RunConfig, yaml.safe_load((run.path / "config.yaml").read_text()))
    shape = (cfg.data.num_sequences, cfg.data.seq_len)
    tokens = load_tokens(run.tokens_path("calibration"), shape)
    if tokens is None:
        sys.exit(f"{run.path} holds no kept calibration windows: run `make demo` (or pass --run) first")
    session = pipeline.open_session(cfg, progress=False, calibration=tokens)
    centres = pipeline.uniform_centres(session.adapter, cfg)
    scratch = Path(tempfile.mkdtemp(prefix="tyr-ray-build-"))
    rows = []
    try:
        work = RunDir(scratch / "run")  # the workers read the kept windows from a run directory
        pipeline.keep_tokens(work, "calibration", tokens)
        # the workers' thread count: a CPU BLAS's float results depend on it (its own blocking of the sums)
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        serial, _ = pipeline.build_iteration_supernet(session, scratch / "serial", centres, 1, progress=False)
        rows.append({"workers": 0, "seconds": time.perf_counter() - t0, **compare(serial, serial)})
        for n in [int(v) for v in args.workers.split(",")]:
            rows.append(
                {
                    "workers": n,
                    **build_on_ray(
                        cfg, session, work, scratch / f"ray-{n}", centres, n, serial, args.threads
                    ),
                }
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = [
        [
            "serial" if r["workers"] == 0 else f"Ray, {r['workers']} worker(s)",
            r["seconds"],
            f"{r['identical_files']}/{r['variants']}",
            r["variants_with_other_units"],
            f"{r['max_relative_weight_difference']:.2e}",
        ]
        for r in rows
    ]
    headers = ["build", "seconds", "files = serial", "variants with other units", "max rel. weight diff"]
    print(markdown_table(headers, table))
    payload = {
        "model": cfg.model.name,
        "calibration": list(shape),
        "genes": len(genes_of(session.adapter.num_layers)),
        "machine": f"{os.cpu_count()} CPU cores, no GPU; Ray workers of 1 CPU each",
        "torch_threads": args.threads,
        "rows": rows,
    }
    print(f"\nwritten {write_results('ray_build', payload)}")


def build_on_ray(
    cfg, session, work: RunDir, directory: Path, centres, num_workers: int, serial, threads: int
) -> dict:
    """Iteration 1's supernet built on `num_workers` local Ray workers; its time and comparison with `serial`."""
    import ray

    from tyr.cluster import RayWorkerPool, connect
    from tyr.cluster_build import build_on_workers

    if not ray.is_initialized():
        connect(None, num_cpus=max(2, num_workers))
    dtype = next(session.model.parameters()).dtype
    pool = RayWorkerPool(
        cfg, work.path, num_workers, num_cpus_per_worker=1, num_threads=threads, model_dtype=dtype
    )
    try:
        ladders = pipeline.plan_ladders(
            session.adapter,
            centres,
            pipeline.iteration_steps(session.adapter, cfg, 1),
            cfg.supernet.num_levels,
        )
        store = SupernetStore.create_or_resume(directory, pipeline.supernet_fingerprint(session, ladders))
        plan = pipeline.build_plan(cfg, ladders)
        pool.on_shards("info", [()] * num_workers)  # every worker loaded before the clock starts
        t0 = time.perf_counter()
        build_on_workers(pool, session.adapter, session.calibration.shape[0], plan, store, progress=False)
        seconds = time.perf_counter() - t0
    finally:
        pool.close()
    return {"seconds": seconds, **compare(serial, SupernetStore.open(directory))}


if __name__ == "__main__":
    main()
