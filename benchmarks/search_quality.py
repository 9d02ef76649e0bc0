"""Search quality on SmolLM2-135M: uniform vs one search iteration vs coarse-to-fine.

Runs `tyr run` with the reference schedule of the issue (2 iterations of 10 + 5 generations, 16 offspring,
selection stages of 512 / 2,048 / 8,192 tokens, 9 levels, top-512 KL, 64x512 calibration tokens of
lee-background), then measures held-out perplexity and KL on `lee` for the uniform structure, the result of
iteration 1 alone, and the final coarse-to-fine result (with validation windows, the best-validating
iteration's result: `final/selection.json`). Also reports each iteration's validation KL (its start and its
result) and seconds per generation. `--set search.selection=legacy --set data.num_validation_sequences=0
--set search.validate_every=0` gives the recipe before validation and paired selection existed.

    python benchmarks/search_quality.py [--sparsities 0.5,0.25] [--out DIR] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import eval_tokens, markdown_table, reference_config, write_results
from tyr import pipeline
from tyr.evaluators.kl import sparse_kl
from tyr.evaluators.perplexity import perplexity
from tyr.evaluators.teacher import compute_teacher_targets
from tyr.run import run
from tyr.rundir import RunDir
from tyr.search.evaluator import SerialEvaluator
from tyr.supernet.store import SupernetStore

REFERENCE_SCHEDULE = [
    "search.num_iterations=2",
    "search.generations=[10,5]",
    "search.num_offspring=16",
    "search.stages=[[4,512],[2,2048],[1,8192]]",
    "search.topk=512",
    "supernet.num_levels=9",
]


def measure(session, store: SupernetStore, genome, tokens, targets) -> dict:
    evaluator = SerialEvaluator(session.model, session.adapter, store, None, tokens)
    evaluator.apply(tuple(genome))
    result = {"ppl": perplexity(session.model, tokens), "kl": sparse_kl(session.model, tokens, *targets)}
    evaluator.close()
    return result


def one_sparsity(sparsity: float, out: Path, extra: list[str]) -> dict:
    cfg = reference_config(f"sparsity={sparsity}", *REFERENCE_SCHEDULE, *extra)
    run_dir = out / f"s{int(sparsity * 100)}"
    final = run(cfg, run_dir, progress=False)
    session = pipeline.open_session(cfg, progress=False)
    tokens = eval_tokens(session)
    targets = compute_teacher_targets(session.model, tokens, cfg.search.topk)
    rd = RunDir(run_dir)
    iter1 = rd.read_result(1)
    one_iteration = measure(session, SupernetStore.open(rd.supernet_dir(1)), iter1["genome"], tokens, targets)
    seconds = [row["seconds"] for i in rd.finished_iterations() for row in rd.read_history(i)]
    validation = {
        i: {
            k: rd.read_result(i).get(k) for k in ("start_validation_kl", "validation_kl", "chosen_generation")
        }
        for i in rd.finished_iterations()
    }
    arch = rd.read_architecture()
    heads = [len(layer["attention"]["kept_heads"]) for layer in arch["layers"]]
    channels = [layer["mlp"]["kept_channels_count"] for layer in arch["layers"]]
    return {
        "sparsity": sparsity,
        "achieved_sparsity": arch["achieved_sparsity"],
        "kept_heads_fraction": sum(heads) / (len(heads) * session.adapter.num_heads),
        "kept_channels_fraction": sum(channels) / (len(channels) * session.adapter.intermediate_size),
        "dense": final["dense"],
        "uniform": final["uniform"],
        "one_iteration": one_iteration,
        "coarse_to_fine": final["searched"],
        "selected_iteration": rd.selection().iteration,
        "validation": validation,
        "selection": cfg.search.selection,
        "num_validation_sequences": cfg.data.num_validation_sequences,
        "seconds_per_generation_median": statistics.median(seconds),
        "seconds_per_generation": seconds,
        "kept_heads_per_layer": heads,
        "kept_channels_per_layer": channels,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.5,0.25")
    parser.add_argument("--out", default="runs/bench-search")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    results, rows = {}, []
    for s in (float(x) for x in args.sparsities.split(",")):
        r = one_sparsity(s, Path(args.out), args.overrides)
        results[str(s)] = r
        for name in ("dense", "uniform", "one_iteration", "coarse_to_fine"):
            rows.append([s, name, r[name]["ppl"], r[name]["kl"]])
        print(
            f"sparsity {s}: uniform {r['uniform']['ppl']:.1f} -> 1 iteration {r['one_iteration']['ppl']:.1f} -> "
            f"coarse-to-fine {r['coarse_to_fine']['ppl']:.1f} (iteration {r['selected_iteration']}); "
            f"{r['seconds_per_generation_median']:.1f} s/gen; validation KL per iteration {r['validation']}",
            flush=True,
        )
        write_results("search_quality", results)
    print(markdown_table(["sparsity", "model", "ppl (lee)", "KL (top-512)"], rows))


if __name__ == "__main__":
    main()
