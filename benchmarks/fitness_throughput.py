"""Fitness throughput: masked vs compact candidate evaluation at about 25 / 50 / 75% sparsity.

Uses one 50%-centred supernet (its ladder spans 0-100% in 12.5% steps) and uniform genomes at levels
-2 / 0 / +2 (attention: one head per step). Each evaluation is the sparse top-K KL of one candidate on
`--sequences` calibration sequences, the fitness hot path of the search; reported as evaluations/s,
tokens/s, and speed relative to the dense model evaluated the same way.

    python benchmarks/fitness_throughput.py --supernet RUN/iter-1/supernet [--sequences 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import markdown_table, reference_config, timed, write_results
from tyr import pipeline
from tyr.evaluators.teacher import compute_and_save_teacher_targets
from tyr.search.batch import Batch
from tyr.search.evaluator import SerialEvaluator
from tyr.supernet.store import SupernetStore
from tyr.supernet.variant import genes_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--supernet", help="an iteration-1 supernet at 50%% (default: build one in a temp dir)"
    )
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    session = pipeline.open_session(reference_config("sparsity=0.5"), progress=False)
    work = Path(tempfile.mkdtemp(prefix="tyr-throughput-"))
    if args.supernet:
        store = SupernetStore.open(args.supernet)
    else:
        store, _ = pipeline.build_iteration_supernet(
            session, work / "supernet", pipeline.uniform_centres(session.adapter, session.cfg), 1
        )
    targets = compute_and_save_teacher_targets(
        session.model, session.calibration[: args.sequences], 512, work / "teacher", batch_size=8
    )
    tokens = session.calibration[: args.sequences]
    rows_idx = Batch(tuple(range(args.sequences)))
    num_tokens = tokens.numel()
    genes = genes_of(session.adapter.num_layers)

    dense_eval = SerialEvaluator(
        session.model, session.adapter, store, targets, tokens, "masked", batch_size=8
    )
    dense_s, _ = timed(lambda: _dense_kl(dense_eval, rows_idx), args.repeats)
    results = {"tokens_per_eval": num_tokens, "dense_s": dense_s, "levels": {}}
    rows = [["dense", "-", dense_s, 1 / dense_s, num_tokens / dense_s, 1.0]]
    for level in (-2, 0, 2):
        genome = tuple(level if store.ladder(g).levels.count(level) else 0 for g in genes)
        sparsity = store.level_entry(genes[1], genome[1]).sparsity
        for mode in ("masked", "compact"):
            evaluator = SerialEvaluator(
                session.model, session.adapter, store, targets, tokens, mode, batch_size=8
            )
            evaluator([genome], rows_idx)  # warm-up: loads and swaps the genes once
            seconds, _ = timed(lambda ev=evaluator, gm=genome: ev([gm], rows_idx), args.repeats)
            evaluator.close()
            results["levels"].setdefault(f"{sparsity:.3f}", {})[mode] = {
                "seconds": seconds,
                "speed_vs_dense": dense_s / seconds,
            }
            rows.append(
                [
                    f"{sparsity:.0%} MLP / {store.level_entry(genes[0], genome[0]).sparsity:.0%} heads",
                    mode,
                    seconds,
                    1 / seconds,
                    num_tokens / seconds,
                    dense_s / seconds,
                ]
            )
            print(rows[-1], flush=True)
    print(markdown_table(["sparsity", "mode", "s / eval", "evals / s", "tokens / s", "speed vs dense"], rows))
    print(f"wrote {write_results('fitness_throughput', results)}")


def _dense_kl(evaluator: SerialEvaluator, batch: Batch) -> float:
    from tyr.evaluators.kl import sparse_kl_targets

    return sparse_kl_targets(
        evaluator.model, evaluator.tokens, evaluator.targets, list(batch.sequences), batch_size=8
    )


if __name__ == "__main__":
    main()
