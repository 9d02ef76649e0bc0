"""Exported pruned model vs dense: parameters, size on disk, prefill latency and decode speed.

For SmolLM2-135M at 25% and 50% sparsity: by default each pruned architecture is the *uniform* genome of a
quickly built iteration-1 supernet (one ladder level per gene, 8x256 calibration tokens, no search), exported
with `tyr.export.export_model`; `--run RUN` exports a finished `tyr run` instead. The dense model is exported
through the same writer (every gene dense) so that both load the same way (`tyr.load_pruned`).

Measured per model, median of `--repeats`: prefill of 1 x 512 tokens (KV cache on, last-position logits only,
as `generate` does) and greedy decoding of 64 new tokens after that prompt with the KV cache
(tokens/s = 63 / (time for 64 new tokens - time for 1)). All models are loaded together and timed
round-robin. Also perplexity on the first 512-token windows of `lee`.

    python -m benchmarks.export_speed [--sparsities 0.25,0.5] [--run RUN] [--repeats 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import markdown_table, write_results
from tyr import pipeline
from tyr.config import resolve_config
from tyr.data import TextSource, evaluation_tokens
from tyr.evaluators.perplexity import perplexity
from tyr.export import export_model, export_run, load_pruned
from tyr.supernet.variant import genes_of


def build_uniform_exports(
    model_name: str, sparsities: list[float], work: Path, calibration_sequences: int = 8
) -> tuple[dict, object, dict]:
    """Dense export plus one uniform-genome export per sparsity; returns ({label: folder}, tokenizer, timings)."""
    overrides = [
        f"model.name={model_name}",
        "supernet.num_levels=1",
        f"data.num_sequences={calibration_sequences}",
        "data.seq_len=256",
        "supernet.mlp_rounds=4",
        "search.stages=[[1,256]]",  # no search here; only the config check needs stages within the data
        "model.device=cpu",
        "model.dtype=float32",
    ]
    session = pipeline.open_session(resolve_config(None, overrides), progress=False)
    genes = genes_of(session.adapter.num_layers)
    folders, seconds = {}, {}
    folders["dense"] = export_model(
        session.model, [None] * len(genes), work / "dense", tokenizer=session.tokenizer, base_model=model_name
    )
    for s in sparsities:
        session.cfg.sparsity = s
        t0 = time.perf_counter()
        centres = pipeline.uniform_centres(session.adapter, session.cfg)
        store, _ = pipeline.build_iteration_supernet(
            session, work / f"supernet-{s}", centres, iteration=1, progress=False
        )
        t1 = time.perf_counter()
        variants = [store.variant(g, 0) for g in genes]
        label = f"uniform {s:.0%}"
        folders[label] = export_model(
            session.model,
            variants,
            work / f"export-{s}",
            tokenizer=session.tokenizer,
            base_model=model_name,
            target_sparsity=s,
        )
        seconds[label] = {"supernet_s": t1 - t0, "export_s": time.perf_counter() - t1}
        print(
            f"[bench] {label}: supernet {t1 - t0:.0f} s, export {seconds[label]['export_s']:.1f} s",
            flush=True,
        )
    return folders, session.tokenizer, seconds


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@torch.inference_mode()
def measure_all(
    folders: dict, prompt: torch.Tensor, new_tokens: int, repeats: int, decode_repeats: int, eval_tokens
) -> dict:
    """All models loaded together and timed round-robin, so that load from other processes hits all alike."""
    models = {label: load_pruned(folder) for label, folder in folders.items()}
    gen = dict(do_sample=False, use_cache=True, pad_token_id=0)
    tasks = {
        "prefill": lambda m: m(prompt, use_cache=True, logits_to_keep=1),
        "generate_1": lambda m: m.generate(prompt, max_new_tokens=1, min_new_tokens=1, **gen),
        "generate_n": lambda m: m.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **gen
        ),
    }
    for model in models.values():  # warm-up
        model(prompt[:, :16], use_cache=True, logits_to_keep=1)
    times = {label: {task: [] for task in tasks} for label in models}
    for r in range(max(repeats, decode_repeats)):
        for task, fn in tasks.items():
            if r >= (decode_repeats if task == "generate_n" else repeats):
                continue
            for label, model in models.items():
                t0 = time.perf_counter()
                fn(model)
                times[label][task].append(time.perf_counter() - t0)
    results = {}
    for label, model in models.items():
        med = {task: statistics.median(ts) for task, ts in times[label].items()}
        arch = json_or_none(folders[label] / "architecture.json")
        results[label] = {
            "model_type": model.config.model_type,
            "params": sum(p.numel() for p in model.parameters()),
            "disk_bytes": weights_bytes(folders[label]),
            "prefill_s": med["prefill"],
            "decode_tok_s": (new_tokens - 1) / max(med["generate_n"] - med["generate_1"], 1e-9),
            "ppl": perplexity(model, eval_tokens) if eval_tokens is not None else None,
            "achieved_sparsity": arch.get("achieved_sparsity") if arch else None,
            "times_s": times[label],
        }
    return results


def json_or_none(path: Path) -> dict | None:
    import json

    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", default="0.25,0.5")
    parser.add_argument(
        "--run", action="append", default=[], help="export this finished run too (repeatable)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills (and 1-token generates)")
    parser.add_argument("--decode-repeats", type=int, default=3, help="timed generates of --new-tokens")
    parser.add_argument(
        "--calibration-sequences",
        type=int,
        default=8,
        help="256-token lee-background windows for the supernet",
    )
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ppl-sequences", type=int, default=4, help="512-token windows of lee (0: skip)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads while timing (default: torch's)"
    )
    parser.add_argument("--out", default=None, help="keep exports and supernets here (default: a temp dir)")
    args = parser.parse_args()

    if args.threads:  # on a shared machine one thread gives far steadier timings than oversubscribed ones
        torch.set_num_threads(args.threads)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tyr-export-speed-"))
    started = time.perf_counter()
    try:
        sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
        folders, tokenizer, build_seconds = build_uniform_exports(
            args.model, sparsities, work, args.calibration_sequences
        )
        for i, run in enumerate(args.run):
            folders[f"run {Path(run).name}"] = export_run(run, work / f"run-{i}", force=True)
        source = TextSource("lee", split="test")
        windows = evaluation_tokens(source, tokenizer, args.prompt_len, max(args.ppl_sequences, 1))
        prompt = windows[:1]
        eval_tokens = windows if args.ppl_sequences else None
        results = measure_all(
            folders, prompt, args.new_tokens, args.repeats, args.decode_repeats, eval_tokens
        )
        for label, r in results.items():
            r.update(build_seconds.get(label, {}))
            print(
                f"[bench] {label}: {r['params'] / 1e6:.1f}M params, {r['disk_bytes'] / 2**20:.0f} MiB, "
                f"prefill {r['prefill_s'] * 1e3:.0f} ms, decode {r['decode_tok_s']:.1f} tok/s",
                flush=True,
            )
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)

    dense = results["dense"]
    rows = []
    for label, r in results.items():
        rows.append(
            [
                label,
                f"{r['params'] / 1e6:.1f}M ({r['params'] / dense['params']:.2f}x)",
                f"{r['disk_bytes'] / 2**20:.0f} MiB ({r['disk_bytes'] / dense['disk_bytes']:.2f}x)",
                f"{r['prefill_s'] * 1e3:.0f} ms ({dense['prefill_s'] / r['prefill_s']:.2f}x faster)",
                f"{r['decode_tok_s']:.1f} ({r['decode_tok_s'] / dense['decode_tok_s']:.2f}x)",
                f"{r['ppl']:.2f}" if r["ppl"] is not None else "",
            ]
        )
    table = markdown_table(
        [
            "model",
            "params",
            "weights on disk",
            f"prefill 1x{args.prompt_len}",
            f"decode tok/s ({args.new_tokens} new)",
            "ppl (lee)",
        ],
        rows,
    )
    print(table)
    print("(uniform genomes, no search, 2k calibration tokens: perplexity is not what `tyr run` reaches)")
    payload = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "decode_repeats": args.decode_repeats,
        "note": "uniform genomes of a quick iteration-1 supernet (no search, 2k calibration tokens): the "
        "perplexities show that the exports run, not what a `tyr run` reaches; fp32 on CPU",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "ppl_tokens": int(eval_tokens.numel()) if eval_tokens is not None else 0,
        "dtype": "float32",
        "seconds": time.perf_counter() - started,
        "results": results,
        "ratios": {
            label: {
                "params": r["params"] / dense["params"],
                "disk": r["disk_bytes"] / dense["disk_bytes"],
                "prefill_speedup": dense["prefill_s"] / r["prefill_s"],
                "decode_speedup": r["decode_tok_s"] / dense["decode_tok_s"],
            }
            for label, r in results.items()
        },
        "table": table,
    }
    print(f"wrote {write_results('export_speed', payload)}")


if __name__ == "__main__":
    main()
