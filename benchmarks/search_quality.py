"""Search quality on SmolLM2-135M: uniform vs one search iteration vs coarse-to-fine, as A/B rows and seeds.

Runs `tyr run` with the reference schedule of the issue (2 iterations of 10 + 5 generations, 16 offspring,
selection stages of 512 / 2,048 / 8,192 tokens, 9 levels, top-512 KL, 64x512 calibration tokens of
lee-background), then measures, for the uniform structure, the result of iteration 1 alone and the final result
(`final/selection.json`):
- KL on the run's validation windows (the next 8 windows of the calibration draw, measured here for every row,
  also for rows whose run had no validation): the number defaults are chosen on;
- held-out perplexity and KL on `lee` (the test set: reported, never used to choose);
- seconds per generation (median).

Two studies, both merged into benchmarks/results/search_quality.json (a row already there is replaced):
- `--study ab` (default `--sparsities 0.5`, seed 0): the defaults, then one row per option switched away from them
  (`ROWS`); each row's run lives in OUT/ROW/s50-seed0 and is resumed if it exists.
- `--study seeds`: the defaults with `--seeds 0,1,2` at `--sparsities 0.5,0.25`; means, and whether the final
  result is no worse than iteration 1 on validation in every seed.

    python -m benchmarks.search_quality --study ab [--rows defaults,refit-dense] [--set key=value ...]
    python -m benchmarks.search_quality --study seeds [--seeds 0,1,2] [--sparsities 0.5,0.25]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from benchmarks.common import RESULTS, eval_tokens, markdown_table, reference_config, write_results
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
NUM_VALIDATION = 8  # the windows every row is measured on (the preset's validation windows)

# A/B rows: each switches one option away from the defaults (the `cpu` preset's search settings).
ROWS: dict[str, list[str]] = {
    "defaults": [],
    "legacy-selection": ["search.selection=legacy"],
    "no-validation": ["data.num_validation_sequences=0", "search.validate_every=0"],
    "refit-dense": ["supernet.refit=dense"],
    "kl+hidden": ["search.fitness=kl+hidden"],
    "no-prefix-cache": ["search.prefix_cache_bytes=0"],
}


def measure(session, store: SupernetStore, genome, tokens, targets) -> dict:
    evaluator = SerialEvaluator(session.model, session.adapter, store, None, tokens)
    evaluator.apply(tuple(genome))
    result = {"ppl": perplexity(session.model, tokens), "kl": sparse_kl(session.model, tokens, *targets)}
    evaluator.close()
    return result


def one_run(sparsity: float, seed: int, run_dir: Path, extra: list[str]) -> dict:
    cfg = reference_config(f"sparsity={sparsity}", f"seed={seed}", *REFERENCE_SCHEDULE, *extra)
    final = run(cfg, run_dir, progress=False)
    # every row is measured on the same validation windows, whatever its own run used
    measured_cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, num_validation_sequences=NUM_VALIDATION)
    )
    session = pipeline.open_session(measured_cfg, progress=False)
    test = eval_tokens(session)
    test_targets = compute_teacher_targets(session.model, test, cfg.search.topk)
    validation = session.validation
    validation_targets = compute_teacher_targets(session.model, validation, cfg.search.topk)
    rd = RunDir(run_dir)
    selected = rd.selection()
    genomes = {
        "uniform": (1, [0] * len(selected.genome)),
        "one_iteration": (1, rd.read_result(1)["genome"]),
        "final": (selected.iteration, list(selected.genome)),
    }
    models = {}
    for name, (iteration, genome) in genomes.items():
        store = SupernetStore.open(rd.supernet_dir(iteration))
        on_test = measure(session, store, genome, test, test_targets)
        on_validation = measure(session, store, genome, validation, validation_targets)
        models[name] = {"ppl": on_test["ppl"], "kl": on_test["kl"], "validation_kl": on_validation["kl"]}
    seconds = [row["seconds"] for i in rd.finished_iterations() for row in rd.read_history(i)]
    arch = rd.read_architecture()
    heads = [len(layer["attention"]["kept_heads"]) for layer in arch["layers"]]
    channels = [layer["mlp"]["kept_channels_count"] for layer in arch["layers"]]
    return {
        "sparsity": sparsity,
        "seed": seed,
        "overrides": extra,
        "achieved_sparsity": arch["achieved_sparsity"],
        "dense_ppl": final["dense"]["ppl"],
        **models,
        "final_no_worse_than_iteration_1_on_validation": models["final"]["validation_kl"]
        <= models["one_iteration"]["validation_kl"],
        "selected_iteration": selected.iteration,
        "in_run_validation": {
            i: {
                k: rd.read_result(i).get(k)
                for k in ("start_validation_kl", "validation_kl", "chosen_generation")
            }
            for i in rd.finished_iterations()
        },
        "seconds_per_generation_median": statistics.median(seconds),
        "num_generations": len(seconds),
        "kept_heads_per_layer": heads,
        "kept_channels_per_layer": channels,
    }


def summary_line(label: str, r: dict) -> str:
    return (
        f"{label}: validation KL uniform {r['uniform']['validation_kl']:.4f} -> iteration 1 "
        f"{r['one_iteration']['validation_kl']:.4f} -> final {r['final']['validation_kl']:.4f} "
        f"(iteration {r['selected_iteration']}); lee ppl {r['uniform']['ppl']:.1f} -> "
        f"{r['one_iteration']['ppl']:.1f} -> {r['final']['ppl']:.1f}; "
        f"{r['seconds_per_generation_median']:.1f} s/gen"
    )


def seeds_summary(by_seed: dict[str, dict]) -> dict:
    rows = list(by_seed.values())

    def mean(model: str, key: str) -> float:
        return statistics.fmean(r[model][key] for r in rows)

    return {
        "num_seeds": len(rows),
        **{
            f"{m}_{k}_mean": mean(m, k)
            for m in ("uniform", "one_iteration", "final")
            for k in ("ppl", "validation_kl")
        },
        "final_ppl_stdev": statistics.stdev(r["final"]["ppl"] for r in rows) if len(rows) > 1 else 0.0,
        "final_no_worse_than_iteration_1_on_validation_in_every_seed": all(
            r["final_no_worse_than_iteration_1_on_validation"] for r in rows
        ),
        "seconds_per_generation_median": statistics.median(r["seconds_per_generation_median"] for r in rows),
    }


def load_results() -> dict:
    path = RESULTS / "search_quality.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) and ("ab" in data or "seeds" in data) else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=("ab", "seeds"), default="ab")
    parser.add_argument("--rows", default=",".join(ROWS), help="A/B rows to run (--study ab)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds (--study seeds)")
    parser.add_argument("--sparsities", default=None, help="default: 0.5 for ab, 0.5,0.25 for seeds")
    parser.add_argument("--out", default="runs/bench-search")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="added to every row")
    args = parser.parse_args()
    sparsities = [
        float(x) for x in (args.sparsities or ("0.5" if args.study == "ab" else "0.5,0.25")).split(",")
    ]
    out = Path(args.out)
    results = load_results()
    table = []
    for s in sparsities:
        tag = f"s{round(s * 100)}"
        if args.study == "ab":
            for name in args.rows.split(","):
                if name not in ROWS:
                    parser.error(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
                r = one_run(s, 0, out / name / f"{tag}-seed0", [*ROWS[name], *args.overrides])
                results.setdefault("ab", {}).setdefault(str(s), {})[name] = r
                print(summary_line(f"{tag} {name}", r), flush=True)
                write_results("search_quality", results)
                table.append(
                    [
                        s,
                        name,
                        r["uniform"]["validation_kl"],
                        r["one_iteration"]["validation_kl"],
                        r["final"]["validation_kl"],
                        r["final"]["ppl"],
                        r["seconds_per_generation_median"],
                    ]
                )
        else:
            by_seed = results.setdefault("seeds", {}).setdefault(str(s), {})
            for seed in (int(x) for x in args.seeds.split(",")):
                r = one_run(s, seed, out / "defaults" / f"{tag}-seed{seed}", args.overrides)
                by_seed[str(seed)] = r
                print(summary_line(f"{tag} seed {seed}", r), flush=True)
                results["seeds"].setdefault("summary", {})[str(s)] = seeds_summary(by_seed)
                write_results("search_quality", results)
                table.append(
                    [
                        s,
                        f"seed {seed}",
                        r["uniform"]["validation_kl"],
                        r["one_iteration"]["validation_kl"],
                        r["final"]["validation_kl"],
                        r["final"]["ppl"],
                        r["seconds_per_generation_median"],
                    ]
                )
    headers = [
        "sparsity",
        "row",
        "val KL uniform",
        "val KL iter 1",
        "val KL final",
        "final ppl (lee)",
        "s/gen",
    ]
    print(markdown_table(headers, table))


if __name__ == "__main__":
    main()
