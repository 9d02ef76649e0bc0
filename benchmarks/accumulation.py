"""Supernet build: expectation error accumulation modes (ALGORITHM §4) and build cost.

For each mode, build the iteration-1 supernet for SmolLM2-135M at 50% on 64x512 tokens of lee-background,
take the uniform structure (every gene at its centre level) and measure held-out perplexity on `lee`.
Also reports the build time divided by one dense forward pass over the same calibration tokens.

    python benchmarks/accumulation.py [--modes expectation,none] [--refits zero,dense] [--sparsity 0.5] [--out DIR]

With several `--refits` (`supernet.refit`: the ridge refit's target), every mode is built with each, on the same
calibration windows, so `center` vs `expectation` is compared with the refit fixed.

Each uniform structure is also scored in sample and out of sample: its top-512 KL on the calibration windows the
supernet was fitted on, and on `--validation` further windows of the same draw (never fitted on). `center` gives
each block exactly the inputs the uniform structure computes (tests/test_builder.py checks it), so it should win
in sample; a loss out of sample with a win in sample is overfitting of the refits to the calibration windows.
`--num-sequences` changes the calibration size (how the gap moves with more data is the second piece of evidence).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import eval_tokens, markdown_table, reference_config, timed, write_results
from tyr import pipeline
from tyr.evaluators.kl import sparse_kl
from tyr.evaluators.perplexity import perplexity
from tyr.evaluators.teacher import compute_teacher_targets
from tyr.search.evaluator import SerialEvaluator
from tyr.supernet.variant import genes_of


def dense_forward_seconds(session) -> float:
    """One forward pass of the dense model (without the LM head) over the calibration tokens."""
    model, tokens, bs = session.model, session.calibration, session.cfg.supernet.batch_size

    def forward() -> None:
        with torch.inference_mode():
            for i in range(0, tokens.shape[0], bs):
                model.model(input_ids=tokens[i : i + bs], use_cache=False)

    seconds, _ = timed(forward)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="expectation,uniform_mean,center,none")
    parser.add_argument("--refits", default="zero", help="supernet.refit values, comma-separated")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", default=None, help="where to keep the supernets (default: a temp dir)")
    parser.add_argument(
        "--num-sequences", type=int, default=64, help="calibration windows (data.num_sequences)"
    )
    parser.add_argument("--validation", type=int, default=32, help="out-of-sample windows of the same draw")
    parser.add_argument(
        "--name", default="accumulation", help="results file name (benchmarks/results/NAME.json)"
    )
    args = parser.parse_args()

    work = Path(args.out or tempfile.mkdtemp(prefix="tyr-accumulation-"))
    cfg = reference_config(
        f"sparsity={args.sparsity}",
        f"data.num_sequences={args.num_sequences}",
        f"data.num_validation_sequences={args.validation}",
    )
    session = pipeline.open_session(cfg, progress=False)
    tokens = eval_tokens(session)
    windows = {"calibration": session.calibration, "validation": session.validation}
    teacher = {name: compute_teacher_targets(session.model, t, 512) for name, t in windows.items()}
    dense_ppl = perplexity(session.model, tokens)
    forward_s = dense_forward_seconds(session)
    print(
        f"dense: ppl {dense_ppl:.2f}; one dense forward over {tuple(session.calibration.shape)} tokens: "
        f"{forward_s:.1f} s",
        flush=True,
    )
    rows, results = (
        [],
        {
            "dense_ppl": dense_ppl,
            "dense_forward_s": forward_s,
            "sparsity": args.sparsity,
            "calibration": list(session.calibration.shape),
            "eval_tokens": int(tokens.numel()),
            "modes": {},
        },
    )
    refits = args.refits.split(",")
    for mode, refit in ((m, r) for m in args.modes.split(",") for r in refits):
        session.cfg.supernet.accumulation, session.cfg.supernet.refit = mode, refit
        name = mode if refits == ["zero"] else f"{mode}, refit {refit}"
        centres = pipeline.uniform_centres(session.adapter, session.cfg)
        t0 = time.perf_counter()
        store, report = pipeline.build_iteration_supernet(
            session, work / f"{mode}-{refit}", centres, iteration=1, progress=False
        )
        build_s = time.perf_counter() - t0
        evaluator = SerialEvaluator(session.model, session.adapter, store, None, session.calibration)
        evaluator.apply(tuple(0 for _ in genes_of(session.adapter.num_layers)))
        ppl = perplexity(session.model, tokens)
        kl = {name: sparse_kl(session.model, t, *teacher[name]) for name, t in windows.items()}
        evaluator.close()
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        results["modes"][name] = {
            "ppl": ppl,
            "calibration_kl": kl["calibration"],
            "validation_kl": kl["validation"],
            "build_s": build_s,
            "pruner_s": report.seconds_pruning,
            "build_over_forward": build_s / forward_s,
            "peak_rss_gib": peak_gib,
        }
        rows.append([name, ppl, kl["calibration"], kl["validation"], build_s, build_s / forward_s, peak_gib])
        print(
            f"{name}: uniform ppl {ppl:.2f}, KL in sample {kl['calibration']:.4f} / out of sample "
            f"{kl['validation']:.4f}, build {build_s:.0f} s ({build_s / forward_s:.2f}x forward), "
            f"peak RSS {peak_gib:.1f} GiB",
            flush=True,
        )
    table = markdown_table(
        [
            "accumulation",
            "uniform ppl (lee)",
            "KL calib.",
            "KL valid.",
            "build s",
            "build / dense fwd",
            "peak RSS GiB",
        ],
        [["dense", dense_ppl, 0.0, 0.0, "", "", ""], *rows],
    )
    print(table)
    results["num_validation_windows"] = args.validation
    path = write_results(args.name, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
