"""Fault injection: SIGKILL `tyr run` and `tyr export` at random moments; the re-run must end identical.

A tiny random Llama (tests/tiny.py) with the `smoke` schedule, so one run takes seconds. First an
uninterrupted reference run and export. Then, for each seeded random point: a fresh run directory, `tyr run`
started and SIGKILLed at a random moment, then the same command again to completion; then `tyr export`
killed at a random moment and re-run. Most of a smoke run's seconds are Python start-up, so a point first
draws a stage (the teacher pass, either iteration's supernet build or search, the final evaluation, or "any
time") and then kills a random 0-40 ms after the run directory shows that stage has begun (or, for "any
time", after a delay drawn over the reference run's duration). "Identical" = the same
final/architecture.json, final/metrics.json, final/selection.json, every iter-N/result.json and every
history.jsonl (timings and I/O counters excluded) as the reference, and byte-identical exported weights and config.

    python -m benchmarks.fault_injection [--points 20] [--seed 0]

Writes benchmarks/results/fault_injection.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import markdown_table, write_results
from tests.tiny import save_tiny_checkpoint, write_corpus
from tyr.rundir import RunDir

# telemetry of the process that ran a generation (a resumed one starts dense, with a warm cache): not results
TIMING_KEYS = ("seconds", "io")


def tyr(*args: str) -> list[str]:
    return [sys.executable, "-m", "tyr.cli", *args]


def run_args(assets: dict, out: Path) -> list[str]:
    return tyr(
        "run", "--model", assets["model"], "--data", assets["data"], "--eval-data", assets["eval"],
        "--schedule", "smoke", "--out", str(out), "--quiet",
    )  # fmt: skip


def timed_run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def kill_after(cmd: list[str], delay: float) -> bool:
    """Start `cmd`, SIGKILL it after `delay` seconds; False when it finished first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


# stage -> "has it begun?" from the run directory's files
STAGES = {
    "teacher": lambda run: run.teacher_dir.is_dir(),
    "build 1": lambda run: run.supernet_dir(1).is_dir(),
    "search 1": lambda run: run.search_dir(1).is_dir(),
    "build 2": lambda run: run.supernet_dir(2).is_dir(),
    "search 2": lambda run: run.search_dir(2).is_dir(),
    "final": lambda run: run.final_dir.is_dir(),
}


def kill_when(cmd: list[str], out: Path, begun, extra: float, timeout: float = 600) -> tuple[bool, float]:
    """Start `cmd`, SIGKILL it `extra` seconds after `begun(RunDir(out))` first holds; (killed, seconds)."""
    run = RunDir(out)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and time.perf_counter() - t0 < timeout:
        if begun(run):
            time.sleep(extra)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True, time.perf_counter() - t0
            break
        time.sleep(0.002)
    proc.wait()
    return False, time.perf_counter() - t0


def phase(out: Path) -> str:
    """Where a killed run stood, from the files it left."""
    run = RunDir(out)
    if not run.has_teacher():
        return "teacher" if run.config_path.is_file() else "start-up"
    if run.architecture_path.is_file():
        return "final"
    for i in reversed(run.iterations()):
        if run.result_path(i).is_file():
            return f"after iteration {i}"
        if run.read_history(i) or run.state_path(i).is_file():
            return f"search {i}"
        return f"build {i}"
    return "build 1"


def run_record(out: Path) -> dict:
    run = RunDir(out)
    histories = {
        i: [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in run.read_history(i)]
        for i in run.iterations()
    }
    return {
        "architecture": run.read_architecture(),
        "metrics": run.read_metrics(),
        "selection": json.loads(run.selection_path.read_text()),
        "results": {i: run.read_result(i) for i in run.iterations()},
        "histories": histories,
    }


def export_record(folder: Path) -> dict:
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.suffix in (".safetensors", ".json") and p.name != "README.md"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="tyr-faults-") as tmp:
        root = Path(tmp)
        assets = {
            "model": str(save_tiny_checkpoint(root / "model")),
            "data": str(write_corpus(root / "calib.txt", num_docs=40, seed=0)),
            "eval": str(write_corpus(root / "eval.txt", num_docs=10, seed=1)),
        }
        reference = root / "reference"
        run_seconds = timed_run(run_args(assets, reference))
        export_cmd = tyr("export", str(reference), "--out", str(root / "reference-export"))
        export_seconds = timed_run(export_cmd)
        want_run, want_export = run_record(reference), export_record(root / "reference-export")
        rows = []
        for point in range(args.points):
            out = root / f"killed-{point}"
            stage = rng.choice([*STAGES, "any time"])
            if stage == "any time":
                delay = rng.uniform(0.3, run_seconds)
                killed = kill_after(run_args(assets, out), delay)
            else:
                killed, delay = kill_when(run_args(assets, out), out, STAGES[stage], rng.uniform(0.0, 0.04))
            where = phase(out) if killed else "finished first"
            subprocess.run(run_args(assets, out), check=True, capture_output=True)
            export_dir = root / f"export-{point}"
            export_delay = rng.uniform(0.3, export_seconds)
            export_killed = kill_after(tyr("export", str(out), "--out", str(export_dir)), export_delay)
            if export_dir.exists():  # a finished export: the re-run must replace it explicitly
                subprocess.run(tyr("export", str(out), "--out", str(export_dir), "--force"), check=True)
            else:
                subprocess.run(
                    tyr("export", str(out), "--out", str(export_dir)), check=True, capture_output=True
                )
            leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp"))
            rows.append(
                {
                    "point": point,
                    "aimed_at": stage,
                    "run_kill_s": round(delay, 2),
                    "run_killed": killed,
                    "phase": where,
                    "export_kill_s": round(export_delay, 2),
                    "export_killed": export_killed,
                    "run_identical": run_record(out) == want_run,
                    "export_identical": export_record(export_dir) == want_export,
                    "temp_files_left": leftovers,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    summary = {
        "points": len(rows),
        "runs_killed": sum(r["run_killed"] for r in rows),
        "exports_killed": sum(r["export_killed"] for r in rows),
        "all_identical": all(r["run_identical"] and r["export_identical"] for r in rows),
        "reference_run_seconds": round(run_seconds, 2),
        "reference_export_seconds": round(export_seconds, 2),
        "phases": sorted({r["phase"] for r in rows}),
    }
    table = markdown_table(
        [
            "point",
            "aimed at",
            "run killed at (s)",
            "phase",
            "export killed at (s)",
            "run identical",
            "export identical",
        ],
        [
            [
                r["point"],
                r["aimed_at"],
                r["run_kill_s"],
                r["phase"],
                r["export_kill_s"],
                r["run_identical"],
                r["export_identical"],
            ]
            for r in rows
        ],
    )
    print(table)
    print(json.dumps(summary, indent=2))
    write_results("fault_injection", {"summary": summary, "points": rows})


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
