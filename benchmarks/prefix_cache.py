"""Prefix cache speed-up: generations of the search with `search.prefix_cache_bytes` on and off, interleaved.

Uses a finished (or at least iteration-1-built) run directory, by default the demo's `runs/demo` (`make demo`):
its config, teacher targets, kept calibration windows and iteration 1's supernet. Each generation is run twice
from the same parent and the same generator state, once with the cache and once without, in alternating order
(on first in even generations, off first in odd ones), so drift in the machine's speed hits both alike. The
two runs must give the same generation result bit for bit; the next generation starts from it. One untimed
warm-up generation comes first (the first evaluator on a store verifies every variant file's sha256 once).

    python -m benchmarks.prefix_cache [--run runs/demo] [--generations 6] [--cache-mib 2048]

Prints a table and writes `benchmarks/results/prefix_cache.json`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, write_results  # noqa: E402
from tyr import pipeline  # noqa: E402
from tyr.data import load_tokens  # noqa: E402
from tyr.evaluators.teacher import TeacherTargets  # noqa: E402
from tyr.run import evolution_config, search_space  # noqa: E402
from tyr.rundir import RunDir  # noqa: E402
from tyr.search.evaluator import SerialEvaluator  # noqa: E402
from tyr.search.evolution import run_generation  # noqa: E402
from tyr.search.space import Genome  # noqa: E402
from tyr.supernet.store import SupernetStore  # noqa: E402


def one_generation(session, store, targets, space, evo, parent: Genome, rng_state: dict, cache_bytes: int):
    """(result, seconds, decoder blocks skipped) of one generation from `parent` with the generator at
    `rng_state`."""
    cfg = session.cfg
    evaluator = SerialEvaluator(
        session.model,
        session.adapter,
        store,
        targets,
        session.calibration,
        mode=cfg.search.realisation,
        batch_size=cfg.search.batch_size,
        prefix_cache_bytes=cache_bytes,
    )
    rng = np.random.default_rng()
    rng.bit_generator.state = copy.deepcopy(rng_state)
    try:
        evaluator.apply(parent)  # both modes start from the parent realised (not timed)
        t0 = time.perf_counter()
        n, t = session.calibration.shape
        result = run_generation(parent, space, evo, evaluator, rng, n, t)
        seconds = time.perf_counter() - t0
        skipped = evaluator.prefix.blocks_skipped if evaluator.prefix is not None else 0
    finally:
        evaluator.close()
    return result, seconds, skipped, rng.bit_generator.state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a run directory with iteration 1's supernet")
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--cache-mib", type=int, default=2048, help="search.prefix_cache_bytes in MiB")
    args = parser.parse_args()

    run = RunDir(args.run)
    if not run.manifest_path(1).is_file() or not run.has_teacher():
        sys.exit(f"{args.run} has no teacher targets or iteration-1 supernet: run `make demo` first")
    cfg = run.load_config()
    saved = load_tokens(run.tokens_path("calibration"), (cfg.data.num_sequences, cfg.data.seq_len))
    session = pipeline.open_session(cfg, progress=False, calibration=saved)
    targets = TeacherTargets.open(run.teacher_dir)
    store = SupernetStore.open(run.supernet_dir(1))
    space = search_space(session, store)
    evo = evolution_config(cfg, args.generations, 1)
    parent: Genome = (0,) * len(space.genes)
    rng_state = np.random.default_rng(cfg.seed).bit_generator.state
    cache_bytes = args.cache_mib << 20

    one_generation(session, store, targets, space, evo, parent, rng_state, 0)  # warm-up: hashes, page cache
    rows, on_s, off_s, skipped_total = [], [], [], 0
    layers = session.adapter.num_layers
    for g in range(1, args.generations + 1):
        modes = ("on", "off") if g % 2 else ("off", "on")
        out = {}
        for mode in modes:
            out[mode] = one_generation(
                session, store, targets, space, evo, parent, rng_state, cache_bytes if mode == "on" else 0
            )
        (r_on, s_on, skipped, state_on), (r_off, s_off, _, state_off) = out["on"], out["off"]
        if (r_on.parent, r_on.fitness, r_on.stage_best) != (r_off.parent, r_off.fitness, r_off.stage_best):
            sys.exit(f"generation {g}: the cache changed the result ({r_on.fitness} vs {r_off.fitness})")
        assert state_on == state_off
        rows.append([g, f"{s_off:.1f}", f"{s_on:.1f}", f"{s_off / s_on:.2f}", r_on.num_evaluations, skipped])
        on_s.append(s_on)
        off_s.append(s_off)
        skipped_total += skipped
        parent, rng_state = r_on.parent, state_on
        print(
            f"generation {g}: off {s_off:.1f} s, on {s_on:.1f} s, {skipped} decoder blocks skipped",
            flush=True,
        )

    ratio = sum(off_s) / sum(on_s)
    print()
    print(
        markdown_table(
            ["generation", "off s", "on s", "off / on", "evaluations", "decoder blocks skipped"], rows
        )
    )
    print(f"\ntotal: off {sum(off_s):.1f} s, on {sum(on_s):.1f} s, speed-up {ratio:.3f}x (identical results)")
    write_results(
        "prefix_cache",
        {
            "run": str(run.path),
            "model": cfg.model.name,
            "selection": cfg.search.selection,
            "stages": cfg.search.stages_for(1),
            "num_offspring": cfg.search.num_offspring,
            "decoder_blocks": layers,
            "cache_bytes": cache_bytes,
            "threads": torch.get_num_threads(),
            "seconds_off": off_s,
            "seconds_on": on_s,
            "median_ratio": statistics.median(a / b for a, b in zip(off_s, on_s, strict=True)),
            "speedup": ratio,
            "decoder_blocks_skipped": skipped_total,
            "identical_results": True,
        },
    )


if __name__ == "__main__":
    main()
