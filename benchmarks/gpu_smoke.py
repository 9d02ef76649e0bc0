"""GPU smoke check (under 10 minutes): Tyr's GPU paths on a random-weight model of a real shape, beside `tyr plan`.

1. One supernet build of the first blocks (`--layers`, both genes each, `supernet.offload=host`): wall time,
   the builder's device ledger and `torch.cuda.max_memory_allocated`, against the plan's build phase for the
   same configuration.
2. One timed fitness call (a compact uniform candidate, sparse top-K KL over `--sequences` x `--seq-len`
   tokens) against the plan's FLOP-based estimate.
3. With two or more GPUs: the same fitness call on the model spread over them (`model.placement: balanced`'s
   map); it must equal the single-GPU value (bf16 tolerance).

    bash benchmarks/gpu_smoke.sh                       # Llama-3.1-8B shapes, 2 blocks, on cuda
    python -m benchmarks.gpu_smoke --device cpu --shape smollm2-135m --layers 1 --sequences 2 --seq-len 128

Random weights are enough: time and memory depend on shapes, not values. Writes
benchmarks/results/gpu_smoke.json. The CPU form checks the script itself (it has run only on the CPU so far).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_results
from tyr import pipeline
from tyr.config import resolve_config
from tyr.evaluators.kl import sparse_kl
from tyr.evaluators.teacher import compute_teacher_targets
from tyr.plan import SHAPES_DIR, build_phase, fitness_call_seconds, plan_context
from tyr.supernet.builder import Offload, build_supernet
from tyr.supernet.families import adapter_for
from tyr.supernet.realise import Realiser
from tyr.supernet.store import SupernetStore
from tyr.supernet.variant import genes_of


def random_model(shape: str, layers: int, device: torch.device, dtype: torch.dtype):
    """A model of `shape` (tyr/shapes/) with its first `layers` blocks and random weights, on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((SHAPES_DIR / f"{shape.replace('/', '--')}.json").read_text())
    config["num_hidden_layers"] = layers
    config = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(args: argparse.Namespace, num_sequences: int):
    return resolve_config(
        None,
        [
            "schedule=paper",
            f"data.num_sequences={num_sequences}",
            f"data.seq_len={args.seq_len}",
            f"search.stages=[[1,{args.seq_len}]]",
            f"search.batch_size={args.sequences}",
            f"supernet.batch_size={min(4, num_sequences)}",
            "supernet.offload=host",
            f"model.dtype={'bfloat16' if args.device != 'cpu' else 'float32'}",
        ],
    )


def build_step(args, model, device, work: Path) -> tuple[dict, SupernetStore]:
    cfg = run_config(args, args.build_sequences)
    adapter = adapter_for(model)
    tokens = torch.randint(0, adapter.model.config.vocab_size, (args.build_sequences, args.seq_len))
    ladders = pipeline.plan_ladders(
        adapter,
        pipeline.uniform_centres(adapter, cfg),
        pipeline.iteration_steps(adapter, cfg, 1),
        cfg.supernet.num_levels,
    )
    store = SupernetStore.create_or_resume(work / "supernet", {"benchmark": "gpu_smoke"})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    report = build_supernet(
        model, adapter, tokens, pipeline.build_plan(cfg, ladders), store, False, Offload("host")
    )
    synchronize(device)
    seconds = time.perf_counter() - t0
    planned = build_phase(plan_context(cfg, "cpu" if device.type == "cpu" else args.gpu, model))
    result = {
        "blocks": adapter.num_layers,
        "sequences": args.build_sequences,
        "seconds": seconds,
        "planned_seconds": planned.seconds,
        "ledger_peak_bytes": report.ledger["peak_bytes"],
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
        "planned_device_bytes": planned.device_bytes,
    }
    return result, SupernetStore.open(work / "supernet")


def fitness_value(model, store: SupernetStore, tokens, values, indices, batch_size: int) -> float:
    adapter = adapter_for(model)
    realiser = Realiser(model, adapter, "compact")
    realiser.apply([store.variant(g, 0) for g in genes_of(adapter.num_layers)])
    try:
        return sparse_kl(model, tokens, values, indices, batch_size=batch_size)
    finally:
        realiser.restore_dense()


def fitness_step(args, model, device, store: SupernetStore) -> dict:
    cfg = run_config(args, args.sequences)
    vocab = model.config.vocab_size
    tokens = torch.randint(
        0, vocab, (args.sequences, args.seq_len), generator=torch.Generator().manual_seed(1)
    )
    k = min(cfg.search.topk, vocab)
    values, indices = compute_teacher_targets(model, tokens, k, batch_size=args.sequences)
    fitness_value(model, store, tokens, values, indices, args.sequences)  # warm-up (kernels, allocator)
    synchronize(device)
    t0 = time.perf_counter()
    value = fitness_value(model, store, tokens, values, indices, args.sequences)
    synchronize(device)
    seconds = time.perf_counter() - t0
    ctx = plan_context(cfg, "cpu" if device.type == "cpu" else args.gpu, model)
    planned = fitness_call_seconds(ctx, args.sequences, args.seq_len)
    result = {"kl": value, "seconds": seconds, "planned_seconds": planned, "tokens": tokens.numel()}
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        result["balanced"] = balanced_step(model, store, tokens, values, indices, args.sequences, value)
    return result


def balanced_step(model, store, tokens, values, indices, batch_size: int, single: float) -> dict:
    from tyr.models import dispatch_balanced, gpu_devices

    devices = gpu_devices()
    spread = dispatch_balanced(model, devices)
    value = fitness_value(spread, store, tokens, values, indices, batch_size)
    return {
        "gpus": len(devices),
        "kl": value,
        "matches_single": abs(value - single) <= 2e-2 * abs(single) + 1e-4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpu", default="h100", help="the rates `tyr plan` uses for its estimates")
    parser.add_argument("--shape", default="meta-llama/Llama-3.1-8B")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--build-sequences", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu (and small sizes) to check the script only")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(args.shape, args.layers, device, dtype)
    with tempfile.TemporaryDirectory(prefix="tyr-gpu-smoke-") as work:
        build, store = build_step(args, model, device, Path(work))
        fitness = fitness_step(args, model, device, store)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": args.shape,
        "build": build,
        "fitness": fitness,
    }
    print(json.dumps(result, indent=2))
    path = write_results("gpu_smoke", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
