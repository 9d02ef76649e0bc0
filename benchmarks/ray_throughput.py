"""Fitness throughput: SerialEvaluator vs the Ray backend with 1 and 2 workers, and Ray's per-candidate overhead.

    python benchmarks/ray_throughput.py                       # builds a tiny smoke run in a temp folder
    python benchmarks/ray_throughput.py --run-dir runs/demo   # any finished (or searched) run directory
    python benchmarks/ray_throughput.py --smollm2 /tmp/smol   # builds/reuses SmolLM2-135M cut to 4 blocks

For each run directory: evaluations per second on one generation's worth of candidates at two batch sizes
(the first stage's sequences and all sequences), serially in this process (1 and 2 torch threads) and on Ray
(1 and 2 workers, 1 CPU and 1 thread each); Ray's fixed costs: actor start-up, the round trip of an empty call
and the per-candidate cost of a no-op evaluation through the scheduler. Prints a markdown table and writes
`benchmarks/results/ray_throughput.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tyr import pipeline  # noqa: E402
from tyr.cluster import RayEvaluator, RayWorkerPool, _Worker, connect  # noqa: E402
from tyr.evaluators.teacher import TeacherTargets  # noqa: E402
from tyr.run import search_space  # noqa: E402
from tyr.rundir import RunDir  # noqa: E402
from tyr.search.batch import Batch  # noqa: E402
from tyr.search.evaluator import SerialEvaluator  # noqa: E402
from tyr.search.evolution import sample_offspring  # noqa: E402
from tyr.supernet.store import SupernetStore  # noqa: E402

SMOL_ARGS = [
    "--model",
    "smollm2-135m",
    "--schedule",
    "smoke",
    "--set",
    "model.num_layers=4",
    "--set",
    "data.seq_len=128",
    "--set",
    "data.num_sequences=16",
    "--set",
    "search.topk=64",
    "--set",
    "search.generations=[1,1]",
    "--set",
    "search.stages=[[3,256],[1,1024]]",
    "--set",
    "supernet.min_mlp_step=32",
    "--set",
    "supernet.channel_multiple=32",
    "--set",
    "data.num_eval_sequences=8",
]


def build_tiny_run(root: Path) -> Path:
    from tests.conftest import smoke_args
    from tests.tiny import save_tiny_checkpoint, write_corpus
    from tyr.cli import main

    assets = {
        "model": str(save_tiny_checkpoint(root / "model")),
        "data": str(write_corpus(root / "calib.txt", num_docs=40, seed=0)),
        "eval": str(write_corpus(root / "eval.txt", num_docs=10, seed=1)),
    }
    run = root / "run"
    if main(smoke_args(assets, run)) != 0:
        raise SystemExit("building the tiny run failed")
    return run


def build_smol_run(run: Path) -> Path:
    from tyr.cli import main

    done = RunDir(run).is_finished()
    if not done and main(["run", *SMOL_ARGS, "--out", str(run), "--quiet"]) != 0:
        raise SystemExit("building the SmolLM2 run failed")
    return run


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(run_dir: Path, num_candidates: int, repeats: int, worker_counts: list[int]) -> dict:
    rd = RunDir(run_dir)
    cfg = rd.load_config()
    supernet_dir = rd.supernet_dir(1)
    session = pipeline.open_session(cfg, progress=False)
    store = SupernetStore.open(supernet_dir)
    targets = TeacherTargets.open(rd.teacher_dir)
    space = search_space(session, store)
    start = tuple(0 for _ in space.genes)
    genomes = sample_offspring(
        start, space, np.random.default_rng(0), num_candidates, cfg.search.max_mutations
    )
    n_first = min(-(-cfg.search.stages[0][1] // targets.seq_len), targets.num_sequences)
    batches = {
        f"{n_first}x{targets.seq_len}": Batch(tuple(range(n_first))),
        f"{targets.num_sequences}x{targets.seq_len}": Batch(tuple(range(targets.num_sequences))),
    }
    load_before = os.getloadavg()[0]
    result: dict = {
        "run_dir": str(run_dir),
        "model": cfg.model.name,
        "num_layers": session.adapter.num_layers,
        "candidates_per_call": num_candidates,
        "repeats": repeats,
        "batches": list(batches),
        "eval_per_s": {},
    }
    before = torch.get_num_threads()
    serial = SerialEvaluator(
        session.model,
        session.adapter,
        store,
        targets,
        session.calibration,
        mode=cfg.search.realisation,
        batch_size=cfg.search.batch_size,
    )
    reference = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        serial(genomes[:2], batches[next(iter(batches))])  # warm-up
        for name, idx in batches.items():
            t = median_time(lambda idx=idx: serial(genomes, idx), repeats)
            result["eval_per_s"].setdefault(f"serial, {threads} thread(s)", {})[name] = num_candidates / t
            reference[name] = serial(genomes, idx)
    serial.close()
    torch.set_num_threads(before)

    # no-op costs: in-process call vs one Ray round trip vs one candidate through the scheduler
    worker = _Worker({})
    payload = [[list(g), 0, 1] for g in genomes]  # work units: [genome, start, stop] of the batch's sequences
    idx_list = Batch(tuple(range(targets.num_sequences))).to_json()
    direct = median_time(lambda: [worker.noop("", "", payload, idx_list) for _ in range(1000)], 3) / 1000
    result["overhead_s"] = {"direct_noop_call": direct}

    for workers in worker_counts:
        measure_ray(result, cfg, run_dir, supernet_dir, workers, genomes, batches, reference, repeats)
    result["load_average"] = [load_before, os.getloadavg()[0]]  # other jobs on the machine skew the numbers
    return result


def measure_ray(result, cfg, run_dir, supernet_dir, workers, genomes, batches, reference, repeats) -> None:
    num_candidates = len(genomes)
    t0 = time.perf_counter()
    pool = RayWorkerPool(cfg, run_dir, workers, num_cpus_per_worker=1)
    evaluator = RayEvaluator(cfg, run_dir, supernet_dir, pool=pool)
    startup = time.perf_counter() - t0
    key = f"ray, {workers} worker(s)"
    result["eval_per_s"][key] = {}
    first = next(iter(batches.values()))
    evaluator(genomes[:2], first)  # warm-up
    for name, idx in batches.items():
        t = median_time(lambda idx=idx: evaluator(genomes, idx), repeats)
        result["eval_per_s"][key][name] = num_candidates / t
        if evaluator(genomes, idx) != reference[name]:
            raise SystemExit(f"Ray ({workers} workers) and serial fitness differ on {name}")
    supernet = (str(supernet_dir.resolve()), evaluator.fingerprint_hash)
    noop = median_time(lambda: pool.evaluate(*supernet, genomes, first, method="noop"), 20)
    result["overhead_s"][f"{key}: start-up (load model in actors)"] = startup
    result["overhead_s"][f"{key}: no-op per candidate, {num_candidates} per call"] = noop / num_candidates
    if workers == 1:
        import ray

        actor = pool.slots[0].actor
        one = [[list(genomes[0]), 0, 1]]
        idx_list = first.to_json()
        ray.get(actor.noop.remote("", "", one, idx_list))
        rtt = median_time(lambda: ray.get(actor.noop.remote("", "", one, idx_list)), 200)
        result["overhead_s"]["ray: round trip of one empty actor call"] = rtt
    pool.close()


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(
            f"\n**{r['model']}** ({r['num_layers']} blocks), {r['candidates_per_call']} candidates per call, "
            f"median of {r['repeats']}; load average {r['load_average'][0]:.1f} before, "
            f"{r['load_average'][1]:.1f} after (on {os.cpu_count()} CPUs)\n"
        )
        lines.append("| backend | " + " | ".join(f"eval/s @ {b} tokens" for b in r["batches"]) + " |")
        lines.append("|---|" + "---:|" * len(r["batches"]))
        for backend, per in r["eval_per_s"].items():
            lines.append(f"| {backend} | " + " | ".join(f"{per[b]:.1f}" for b in r["batches"]) + " |")
        lines.append("\n| fixed cost | time |\n|---|---:|")
        for what, seconds in r["overhead_s"].items():
            if seconds >= 1:
                shown = f"{seconds:.2f} s"
            elif seconds >= 1e-3:
                shown = f"{seconds * 1e3:.2f} ms"
            else:
                shown = f"{seconds * 1e6:.1f} µs"
            lines.append(f"| {what} | {shown} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", action="append", default=[], help="a run directory (repeatable)")
    parser.add_argument(
        "--smollm2", metavar="DIR", help="build (or reuse) a SmolLM2-135M run cut to 4 blocks"
    )
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny run built by default")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ray_throughput.json"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    with tempfile.TemporaryDirectory() as tmp:
        runs = [Path(p) for p in args.run_dir]
        if not args.no_tiny and not runs:
            runs.append(build_tiny_run(Path(tmp)))
        if args.smollm2:
            runs.append(build_smol_run(Path(args.smollm2)))
        connect(None, num_cpus=os.cpu_count(), verbose=False)
        results = [measure(r, args.candidates, args.repeats, args.workers) for r in runs]
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "ray": __import__("ray").__version__,
        },
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(results))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
