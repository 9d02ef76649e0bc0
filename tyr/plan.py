"""`tyr plan`: what a run will need, per phase, from the model's shapes alone — no weights, no data, no GPU.

The model is built from its config.json on the meta device (exact parameter counts and unit layout); configs
of the shipped models lie in `tyr/shapes/`, so every shipped config plans offline. For each phase — the
teacher pass, one supernet build, one search generation, the final evaluation, the export — it gives the
compute device's memory, host RAM, disk it adds, and an estimated time on a given accelerator; then whether
the whole run fits the stated memory and disk, and which settings to change when it does not.

Memory follows what the code holds (the build's terms are those of `supernet/ledger.py`, whose per-gene record
`build.json` is the measured counterpart); times are arithmetic: FLOPs over an effective rate, bytes over a
bandwidth. Both are estimates, and `benchmarks/build_memory.py` prints the planned bytes beside the measured
ones. Not modelled: kernel temporaries, the allocator's fragmentation, Python's own memory (~1 GiB).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tyr.config import RunConfig
from tyr.errors import TyrError

GIB = 1 << 30
SHAPES_DIR = Path(__file__).resolve().parent / "shapes"
LOGIT_BUDGET = 1 << 27  # logits per chunk of the vocabulary projection (evaluators/kl.py)
KL_BYTES_PER_TARGET = 2 + 4 + 8 + 8 + 4 * 5  # values fp16, ids int32, ids int64, gather index, ~5 fp32 (n, K)
TARGET_BYTES = 6  # a stored teacher target: fp16 value + int32 id


@dataclass(frozen=True)
class Hardware:
    """Effective rates (not peaks) of one accelerator, for time estimates."""

    name: str
    memory_gb: float  # device memory
    matmul_tflops: float  # bf16 dense GEMMs as reached by a transformer forward
    fp32_tflops: float  # plain fp32 GEMMs (Hessians with TF32 off)
    tf32_tflops: float
    fp64_tflops: float  # the local pruner's float64 solves
    h2d_gbps: float  # host-to-device copies (pinned)
    disk_gbps: float  # sequential write/read of large files
    sha_gbps: float = 1.0  # sha256 of a file, one core


HARDWARE = {
    "h100": Hardware("NVIDIA H100-SXM 80GB", 80, 450, 50, 400, 50, 20, 2.0),
    "a100": Hardware("NVIDIA A100 80GB", 80, 230, 19.5, 140, 19.5, 20, 2.0),
    "mi250": Hardware("AMD MI250 (one GCD pair, 128 GB)", 128, 180, 45, 45, 45, 16, 2.0),
    "cpu": Hardware("CPU (a few cores)", 0, 0.2, 0.1, 0.1, 0.05, 10, 1.0),
}


@dataclass
class Phase:
    device_bytes: int = 0  # the compute device's peak (host RAM when the device is the CPU)
    host_bytes: int = 0  # host RAM peak besides the device's
    disk_bytes: int = 0  # disk the phase adds (kept afterwards unless noted)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Shapes:
    """What the plan needs to know about the model."""

    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    params: int  # all parameters (embeddings, head if untied, norms, ...)
    prunable_params: int  # q, k, v, o, gate, up, down
    embedding_params: int  # input embedding (+ the head when untied)


# ---------------------------------------------------------------------------------------------------- shapes
def model_config_dict(name: str) -> dict:
    """config.json of `name`: a local folder, a shipped model (tyr/shapes/), or the local hub cache."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
        if not path.is_file():
            raise TyrError(f"model folder {folder} has no config.json")
        return _read_json(path)
    shipped = SHAPES_DIR / f"{name.replace('/', '--')}.json"
    if shipped.is_file():
        return _read_json(shipped)
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name, local_files_only=True).to_dict()
    except (OSError, ValueError):
        known = ", ".join(sorted(p.stem.replace("--", "/") for p in SHAPES_DIR.glob("*.json")))
        raise TyrError(
            f"no config.json for {name!r} here (offline): pass a local model folder, or one of {known}"
        ) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TyrError(f"{path} is unreadable: {e}") from None


def model_shapes(cfg: RunConfig) -> tuple[Shapes, Any]:
    """(shapes, adapter) of the configured model, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = dict(model_config_dict(cfg.model.name))
    config_dict.pop("quantization_config", None)
    model_type = config_dict.get("model_type")
    try:
        config = AutoConfig.for_model(**config_dict)
    except (ValueError, KeyError) as e:
        raise TyrError(f"cannot read the config of {cfg.model.name!r}: {e}") from None
    if cfg.model.num_layers is not None:
        config.num_hidden_layers = min(cfg.model.num_layers, config.num_hidden_layers)
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: config.num_hidden_layers]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return shapes_of(model, str(model_type))


def shapes_of(model: Any, model_type: str | None = None) -> tuple[Shapes, Any]:
    """(shapes, adapter) of a loaded (or meta-device) causal LM."""
    from tyr.supernet.families import adapter_for

    adapter = adapter_for(model)
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    shapes = Shapes(
        model_type=str(model_type or adapter.model_type),
        num_layers=adapter.num_layers,
        hidden=adapter.hidden_size,
        intermediate=adapter.intermediate_size,
        num_heads=adapter.num_heads,
        num_kv_heads=adapter.num_kv_heads,
        head_dim=adapter.head_dim,
        vocab=int(model.get_input_embeddings().weight.shape[0]),
        params=params,
        prunable_params=adapter.dense_prunable_params(),
        embedding_params=embed + (0 if tied or head is None else head.weight.numel()),
    )
    return shapes, adapter


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Budget:
    """What the user has (GB); None = unknown (not checked)."""

    gpu_memory_gb: float | None
    host_memory_gb: float | None
    disk_gb: float | None


def dtype_bytes(cfg: RunConfig, gpu: str) -> int:
    """Bytes per weight/activation element: model.dtype, where auto = bf16 on a GPU and fp32 on the CPU."""
    name = cfg.model.dtype
    if name == "auto":
        return 4 if gpu == "cpu" else 2
    return 4 if name in ("float32", "fp32") else 2


def make_plan(
    cfg: RunConfig, gpu: str = "h100", budget: Budget | None = None, model: Any = None, num_gpus: int = 1
) -> dict:
    """The plan as a JSON-serialisable dict (the shape of `tyr plan --json`). `model`: a loaded model to plan
    for instead of cfg.model.name's config (benchmarks); `num_gpus`: GPUs one process uses (balanced)."""
    ctx = plan_context(cfg, gpu, model, num_gpus)
    hw = ctx.hw
    shapes = ctx.shapes
    phases = {
        "teacher": teacher_phase(ctx),
        "build": build_phase(ctx),
        "search_generation": search_generation_phase(ctx),
        "final_eval": final_eval_phase(ctx),
        "export": export_phase(ctx),
    }
    totals = run_totals(ctx, phases)
    budget = budget or Budget(hw.memory_gb or None, None, None)
    fits, advice = check_fit(ctx, phases, totals, budget)
    return {
        "model": cfg.model.name,
        "gpu": gpu,
        "hardware": asdict(hw),
        "shapes": asdict(shapes),
        "assumptions": _assumptions(ctx),
        "phases": {name: p.to_json() for name, p in phases.items()},
        "totals": totals,
        "budget": asdict(budget),
        "fits": fits,
        "advice": advice,
    }


def plan_context(cfg: RunConfig, gpu: str = "h100", model: Any = None, num_gpus: int = 1) -> _Context:
    if gpu not in HARDWARE:
        raise TyrError(f"unknown --gpu {gpu!r}; choose one of {', '.join(HARDWARE)}")
    if num_gpus < 1:
        raise TyrError(f"--gpus must be >= 1, got {num_gpus}")
    shapes, adapter = model_shapes(cfg) if model is None else shapes_of(model)
    return _Context(cfg, shapes, adapter, HARDWARE[gpu], dtype_bytes(cfg, gpu), gpu == "cpu", num_gpus)


@dataclass(frozen=True)
class _Context:
    cfg: RunConfig
    shapes: Shapes
    adapter: Any
    hw: Hardware
    b: int  # bytes per element of weights and activations
    cpu: bool
    num_gpus: int = 1

    @property
    def weights(self) -> int:
        return self.shapes.params * self.b

    @property
    def placement(self) -> str:
        return "single" if self.cpu else self.cfg.model.placement

    def device_share(self, nbytes: int) -> int:
        """The part of per-block bytes (e.g. compact copies) on the most loaded device."""
        s = self.shapes
        if self.placement == "offload":
            return math.ceil(nbytes / s.num_layers)
        if self.placement == "balanced" and self.num_gpus > 1:
            return math.ceil(nbytes * math.ceil(s.num_layers / self.num_gpus) / s.num_layers)
        return nbytes

    def transfer_seconds(self, num_passes: float, keep: float = 1.0) -> float:
        """Host-to-device time of `num_passes` passes over the blocks' weights (placement offload only)."""
        if self.placement != "offload":
            return 0.0
        moved = (self.shapes.params - self.shapes.embedding_params) * self.b * keep
        return num_passes * moved / (self.hw.h2d_gbps * 1e9)

    @property
    def device_weights(self) -> int:
        """Weights on the (most loaded) device: all of them (single), a share of the blocks plus the
        embedding or head (balanced), or one block plus the embedding and head (offload)."""
        s = self.shapes
        block = (s.params - s.embedding_params) // s.num_layers * self.b
        edges = s.embedding_params * self.b
        if self.placement == "offload":
            return block + edges
        if self.placement == "balanced" and self.num_gpus > 1:
            return math.ceil(s.num_layers / self.num_gpus) * block + edges
        return self.weights

    @property
    def tokens(self) -> int:
        return self.cfg.data.num_sequences * self.cfg.data.seq_len

    @property
    def keep(self) -> float:
        return 1.0 - self.cfg.sparsity


def _forward_flops(ctx: _Context, tokens: int, positions: int, keep: float = 1.0, head: bool = True) -> float:
    """Forward FLOPs over `tokens` tokens of sequences of `positions` (causal attention), at density `keep`."""
    s = ctx.shapes
    dense = 2 * s.prunable_params * keep
    attention = 2 * s.num_layers * s.num_heads * keep * s.head_dim * positions  # QK + AV, causal: x T/2 x2
    vocab = 2 * s.hidden * s.vocab if head else 0
    return tokens * (dense + attention + vocab)


def _activation_bytes(ctx: _Context, sequences: int) -> int:
    """Live activations of one block's forward over `sequences` sequences (residual, q/k/v/o, MLP)."""
    s, t = ctx.shapes, ctx.cfg.data.seq_len
    return sequences * t * (4 * s.hidden + 3 * s.intermediate) * ctx.b


def teacher_phase(ctx: _Context) -> Phase:
    """Dense top-K logits of the calibration set, streamed to disk batch by batch."""
    cfg, s = ctx.cfg, ctx.shapes
    bs, t, k = cfg.search.batch_size, cfg.data.seq_len, min(cfg.search.topk, s.vocab)
    topk = bs * t * k * (4 + 8)  # the batch's top-K values (fp32) and ids (int64) before the write
    targets = ctx.tokens * k * TARGET_BYTES
    hidden = teacher_hidden_bytes(ctx)
    p = Phase(
        device_bytes=ctx.device_weights + _activation_bytes(ctx, bs) + LOGIT_BUDGET * 4 + topk,
        host_bytes=ctx.weights + bs * t * k * TARGET_BYTES,  # loading goes through host RAM once
        disk_bytes=targets + hidden,
    )
    p.seconds = (
        _forward_flops(ctx, ctx.tokens, t) * (2 if hidden else 1) / (ctx.hw.matmul_tflops * 1e12)
        + (targets + hidden) * (1 / (ctx.hw.disk_gbps * 1e9) + 1 / (ctx.hw.sha_gbps * 1e9))
        + ctx.transfer_seconds(math.ceil(cfg.data.num_sequences / bs))
    )
    p.notes.append(f"targets {targets / GIB:.1f} GiB on disk (N x T x top-{k} x 6 bytes), hashed once")
    if hidden:
        p.notes.append(
            f"search.fitness kl+hidden: teacher hidden states {hidden / GIB:.1f} GiB on disk "
            "(N x T x 3 blocks x hidden x 2 bytes; a second dense pass)"
        )
    return p


def teacher_hidden_bytes(ctx: _Context) -> int:
    """Disk bytes of the stored teacher hidden states (0 unless `search.fitness: kl+hidden`)."""
    return ctx.tokens * hidden_bytes_per_token(ctx)


def hidden_bytes_per_token(ctx: _Context) -> int:
    if ctx.cfg.search.fitness != "kl+hidden":
        return 0
    # torch comes with it: imported only for this setting, so the plan stays light otherwise
    from tyr.evaluators.hidden import hidden_bytes

    return hidden_bytes(1, ctx.shapes.hidden, ctx.shapes.num_layers)


def _offload_mode(ctx: _Context) -> str:
    mode = ctx.cfg.supernet.offload
    if mode == "auto":
        return "none" if ctx.cpu else "host"
    return mode


def build_ledger_phases(ctx: _Context, d_in: int, d_out: int, hidden_on_device: int) -> dict[str, int]:
    """The builder's device ledger for one gene, per phase (supernet/builder.py's terms, same names)."""
    cfg, b = ctx.cfg, ctx.b
    chunk_tokens = min(cfg.supernet.batch_size, cfg.data.num_sequences) * cfg.data.seq_len
    chunk = chunk_tokens * ctx.shapes.hidden * b
    stats = d_in * d_in * 4 + d_in * 8
    x = chunk_tokens * d_in
    input_bytes = x * b + x * (8 + (4 if b != 4 else 0))  # the input, its fp64 copy (sum X), fp32 copy
    on_device = hidden_on_device > 0
    kept_inputs = ctx.tokens * d_in * b if on_device else 0  # offload none keeps them for the second pass
    solve = 8 if cfg.supernet.solve_dtype == "float64" else 4
    out = chunk_tokens * d_out * b
    return {
        "capture": hidden_on_device + (0 if on_device else chunk) + input_bytes + stats + kept_inputs,
        "prune": hidden_on_device + kept_inputs + stats + (5 * d_in * d_in + 5 * d_in * d_out) * solve,
        "propagate": hidden_on_device + kept_inputs + d_out * d_in * b + (0 if on_device else chunk) + out,
    }


def supernet_bytes(ctx: _Context) -> int:
    """Bytes of one iteration's variants: every level's kept output-projection columns (iteration 1's ladders)."""
    from tyr import pipeline

    adapter, cfg = ctx.adapter, ctx.cfg
    storage = (
        ctx.b if cfg.supernet.storage_dtype == "auto" else (4 if "32" in cfg.supernet.storage_dtype else 2)
    )
    ladders = pipeline.plan_ladders(
        adapter,
        pipeline.uniform_centres(adapter, cfg),
        pipeline.iteration_steps(adapter, cfg, 1),
        cfg.supernet.num_levels,
    )
    columns = sum(
        (ld.num_units - ld.removed(lv)) * adapter.group_size(ld.gene.kind)
        for ld in ladders
        for lv in ld.levels
    )
    return columns * ctx.shapes.hidden * storage


def build_terms(ctx: _Context) -> dict[str, int]:
    """The build's memory, term by term (bytes): the builder's device ledger at its peak (`ledger`:
    supernet/ledger.py's terms), the device's working set at its peak (`working`: the ledger plus a module's
    forward over one chunk in the phases that run it), host RAM besides the weights (`hidden_host`; one
    gene's `gene_variants` before they are written), and the offload file (`hidden_disk`)."""
    cfg, s = ctx.cfg, ctx.shapes
    mode = _offload_mode(ctx)
    hidden_all = ctx.tokens * s.hidden * ctx.b
    on_device = hidden_all if mode == "none" else 0
    attn_in, mlp_in = s.num_heads * s.head_dim, s.intermediate
    genes = [build_ledger_phases(ctx, d, s.hidden, on_device) for d in (attn_in, mlp_in)]
    ledger = max(v for phases in genes for v in phases.values())
    chunk = min(cfg.supernet.batch_size, cfg.data.num_sequences)
    activations = _activation_bytes(ctx, chunk)  # the module's forward over a chunk
    forward = ("capture",) if mode == "none" else ("capture", "propagate")  # none reuses pass 1's inputs
    working = max(v + (activations if phase in forward else 0) for p in genes for phase, v in p.items())
    levels = cfg.supernet.num_levels
    gene_variants = int(levels * ctx.keep * max(attn_in, mlp_in) * s.hidden * _storage_bytes(ctx))
    return {
        "ledger": ledger,
        "working": working,
        "hidden_host": hidden_all if mode == "host" else 0,
        "hidden_disk": hidden_all if mode == "disk" else 0,
        "gene_variants": gene_variants,
    }


def _storage_bytes(ctx: _Context) -> int:
    name = ctx.cfg.supernet.storage_dtype
    return ctx.b if name == "auto" else (4 if name in ("float32", "fp32") else 2)


def build_phase(ctx: _Context) -> Phase:
    """One iteration's supernet build (every gene at every level), streamed block by block."""
    cfg, s = ctx.cfg, ctx.shapes
    mode = _offload_mode(ctx)
    terms = build_terms(ctx)
    hidden_all = ctx.tokens * s.hidden * ctx.b
    attn_in, mlp_in = s.num_heads * s.head_dim, s.intermediate
    p = Phase(
        device_bytes=ctx.device_weights + terms["working"],
        host_bytes=ctx.weights + terms["hidden_host"] + terms["gene_variants"],
        disk_bytes=supernet_bytes(ctx) + terms["hidden_disk"],
    )
    passes = 1 if mode == "none" else 2  # host/disk recompute each projection input in a second pass
    hessian = 2 * ctx.tokens * s.num_layers * (attn_in**2 + mlp_in**2)
    hessian_rate = ctx.hw.tf32_tflops if cfg.supernet.hessian_tf32 else ctx.hw.fp32_tflops
    solve_rate = ctx.hw.fp64_tflops if cfg.supernet.solve_dtype == "float64" else ctx.hw.fp32_tflops
    pruner = s.num_layers * cfg.supernet.num_levels * 0.65 * (attn_in**3 + mlp_in**3)  # estimate
    p.seconds = (
        passes * _forward_flops(ctx, ctx.tokens, cfg.data.seq_len, head=False) / (ctx.hw.matmul_tflops * 1e12)
        + hessian / (hessian_rate * 1e12)
        + pruner / (solve_rate * 1e12)
        + 2 * supernet_bytes(ctx) / (ctx.hw.disk_gbps * 1e9)  # written, then hashed
    )
    if mode != "none":
        p.seconds += passes * hidden_all / (ctx.hw.h2d_gbps * 1e9)
    p.seconds += ctx.transfer_seconds(1)  # placement offload: each block comes to the device once
    p.notes.append(
        f"supernet.offload={mode}: the build's working set on the device is "
        f"{terms['working'] / GIB:.2f} GiB besides the weights"
    )
    if mode == "disk":
        p.notes.append(f"offload file {hidden_all / GIB:.1f} GiB, removed when the build ends")
    if cfg.backend.kind == "ray" and cfg.backend.num_workers > 1:
        w = cfg.backend.num_workers
        p.notes.append(
            f"backend ray: the figures are one process's (a serial build); on Ray the build runs on the {w} "
            f"workers (docs/ray.md), each holding ~1/{w} of the hidden states ({hidden_all / w / GIB:.1f} GiB) "
            f"and doing ~1/{w} of the forwards and Hessians; the workers add their partial Hessians pairwise "
            f"(a worker holds up to two: {2 * mlp_in**2 * 4 / GIB:.1f} GiB of host RAM for an MLP gene)"
        )
    return p


def _stage_work(ctx: _Context) -> list[tuple[int, int, int]]:
    """(candidates, sequences, positions) of each selection stage of one generation (parent in the last)."""
    cfg = ctx.cfg
    t, n = cfg.data.seq_len, cfg.data.num_sequences
    out, candidates = [], cfg.search.num_offspring
    for i, (survivors, tokens) in enumerate(cfg.search.stages):
        last = i == len(cfg.search.stages) - 1
        count = candidates + (1 if last else 0)
        sequences, positions = (1, tokens) if tokens < t else (min(math.ceil(tokens / t), n), t)
        out.append((count, sequences, positions))
        candidates = survivors
    return out


def fitness_call_seconds(ctx: _Context, sequences: int, positions: int) -> float:
    """One candidate's fitness on `sequences` x `positions` tokens: its forward FLOPs at the target density."""
    return _forward_flops(ctx, sequences * positions, positions, ctx.keep) / (ctx.hw.matmul_tflops * 1e12)


def search_generation_phase(ctx: _Context) -> Phase:
    """One generation of the evolutionary search (serial backend), at the target sparsity."""
    cfg, s = ctx.cfg, ctx.shapes
    k = min(cfg.search.topk, s.vocab)
    stages = _stage_work(ctx)
    bs = cfg.search.batch_size
    compact = ctx.device_share(int(s.prunable_params * ctx.keep * ctx.b))  # the candidate's sliced copies
    kl = bs * cfg.data.seq_len * k * KL_BYTES_PER_TARGET
    per_token = k * TARGET_BYTES + hidden_bytes_per_token(ctx)  # top-K targets (+ hidden states: kl+hidden)
    rows = max(seq * pos * per_token for _, seq, pos in stages)  # a stage's teacher rows, read once
    resident = supernet_bytes(ctx)
    cache = cfg.search.variant_cache_bytes
    variants = resident if cache is None else min(resident, int(cache))
    p = Phase(
        device_bytes=ctx.device_weights
        + compact
        + _activation_bytes(ctx, bs)
        + kl
        + cfg.search.prefix_cache_bytes,
        host_bytes=variants + rows,
    )
    teacher_read = sum(seq * pos * per_token for _, seq, pos in stages)
    p.seconds = (
        sum(c * fitness_call_seconds(ctx, seq, pos) for c, seq, pos in stages)
        + teacher_read / (ctx.hw.disk_gbps * 1e9)
        + ctx.transfer_seconds(sum(c * math.ceil(seq / bs) for c, seq, _ in stages), ctx.keep)
    )
    tokens = sum(c * seq * pos for c, seq, pos in stages)
    p.notes.append(f"{sum(c for c, _, _ in stages)} candidate evaluations, {tokens:,} tokens per generation")
    if (
        ctx.hw.memory_gb and ctx.placement == "single"
    ):  # search.variant_device_bytes (auto: 40% of free memory)
        free = ctx.hw.memory_gb * 1e9 - ctx.device_weights  # free when the search starts: the weights loaded
        wanted = cfg.search.variant_device_bytes
        on_device = (resident if resident <= 0.4 * free else 0) if wanted is None else min(resident, wanted)
        p.device_bytes += on_device
        p.notes.append(
            f"variants on the GPU (search.variant_device_bytes): {on_device / GIB:.1f} of the supernet's "
            f"{resident / GIB:.1f} GiB" + ("" if on_device else "; swaps copy from host RAM")
        )
    return p


def final_eval_phase(ctx: _Context) -> Phase:
    """Dense, uniform and searched held-out perplexity and KL (eval targets held in RAM)."""
    cfg, s = ctx.cfg, ctx.shapes
    k = min(cfg.search.topk, s.vocab)
    windows = cfg.data.num_eval_sequences or 80  # unknown without the data: ~WikiText-2 test at 4096
    tokens = windows * cfg.data.seq_len
    p = Phase(
        device_bytes=ctx.device_weights
        + ctx.device_share(int(s.prunable_params * ctx.keep * ctx.b))
        + _activation_bytes(ctx, cfg.search.batch_size)
        + LOGIT_BUDGET * 4,
        host_bytes=tokens * k * TARGET_BYTES,
    )
    p.seconds = (
        (3 + 2 * ctx.keep) * _forward_flops(ctx, tokens, cfg.data.seq_len) / (ctx.hw.matmul_tflops * 1e12)
    )
    if cfg.data.num_eval_sequences is None:
        p.notes.append("eval windows unknown without the data: 80 assumed (set data.num_eval_sequences)")
    return p


def export_phase(ctx: _Context) -> Phase:
    """`tyr export`: the dense model on the CPU, the realised (compact) state dict, written as safetensors."""
    pruned = int((ctx.shapes.params - ctx.shapes.prunable_params * (1 - ctx.keep)) * ctx.b)
    p = Phase(device_bytes=0, host_bytes=ctx.weights + pruned, disk_bytes=pruned)
    p.seconds = pruned / (ctx.hw.disk_gbps * 1e9)
    p.notes.append("runs on the CPU: the device is not used")
    return p


def run_totals(ctx: _Context, phases: dict[str, Phase]) -> dict:
    """Peaks over the phases, the whole run's disk, and its estimated time."""
    cfg = ctx.cfg
    from tyr.methods import is_one_shot

    iterations = 1 if is_one_shot(cfg.search.method) else cfg.search.num_iterations
    generations = 0 if is_one_shot(cfg.search.method) else sum(cfg.search.generations[:iterations])
    build, gen = phases["build"], phases["search_generation"]
    offload_file = ctx.tokens * ctx.shapes.hidden * ctx.b if _offload_mode(ctx) == "disk" else 0
    disk = (
        phases["teacher"].disk_bytes
        + iterations * (build.disk_bytes - offload_file)
        + offload_file
        + phases["export"].disk_bytes
    )
    seconds = {
        "teacher": phases["teacher"].seconds,
        "builds": iterations * build.seconds,
        "search": generations * gen.seconds,
        "final_eval": phases["final_eval"].seconds,
        "export": phases["export"].seconds,
    }
    return {
        "device_bytes": max(p.device_bytes for p in phases.values()),
        "host_bytes": max(p.host_bytes for p in phases.values()),
        "disk_bytes": disk,
        "seconds": sum(seconds.values()),
        "seconds_by_phase": seconds,
        "iterations": iterations,
        "generations": generations,
    }


def check_fit(
    ctx: _Context, phases: dict[str, Phase], totals: dict, budget: Budget
) -> tuple[bool, list[str]]:
    """Whether device, host and disk suffice; what to change when they do not."""
    advice = []
    gb = 1e9
    device = totals["device_bytes"]
    if ctx.cpu:  # the device is host RAM
        host_need = device + totals["host_bytes"]
        device_ok = True
    else:
        host_need = totals["host_bytes"]
        device_ok = budget.gpu_memory_gb is None or device <= budget.gpu_memory_gb * gb
    host_ok = budget.host_memory_gb is None or host_need <= budget.host_memory_gb * gb
    disk_ok = budget.disk_gb is None or totals["disk_bytes"] <= budget.disk_gb * gb
    if not device_ok:
        worst = max(phases, key=lambda name: phases[name].device_bytes)
        advice.append(
            f"device memory: {worst} needs {device / gb:.0f} GB of {budget.gpu_memory_gb:g} GB; "
            + _device_advice(ctx, worst)
        )
    if not host_ok:
        advice.append(
            f"host memory: {host_need / gb:.0f} GB needed of {budget.host_memory_gb:g} GB; use "
            "supernet.offload=disk, a smaller search.variant_cache_bytes, or fewer data.num_sequences"
        )
    if not disk_ok:
        advice.append(
            f"disk: {totals['disk_bytes'] / gb:.0f} GB needed of {budget.disk_gb:g} GB; lower search.topk "
            "(teacher targets are N x T x K x 6 bytes) or data.num_sequences, or put RUN/teacher on another disk"
        )
    return device_ok and host_ok and disk_ok, advice


def _device_advice(ctx: _Context, phase: str) -> str:
    if ctx.device_weights > 0.8 * (ctx.hw.memory_gb or 1e9) * 1e9:
        return (
            "the weights do not fit one device: model.placement=offload (one block at a time on the device), "
            "or model.placement=balanced over more GPUs (--gpus)"
        )
    if phase == "build" and _offload_mode(ctx) == "none":
        return "use supernet.offload=host (or disk): the device then holds one chunk, not every sequence"
    if phase in ("search_generation", "teacher", "final_eval"):
        return "lower search.batch_size (sequences per forward) or search.topk"
    return "lower supernet.batch_size or use supernet.solve_dtype=float32"


def _assumptions(ctx: _Context) -> list[str]:
    return [
        f"{ctx.b}-byte weights and activations (model.dtype={ctx.cfg.model.dtype})",
        f"effective rates of {ctx.hw.name}: {ctx.hw.matmul_tflops:g} TFLOP/s bf16 GEMMs, "
        f"{ctx.hw.fp32_tflops:g} fp32, {ctx.hw.fp64_tflops:g} fp64, {ctx.hw.disk_gbps:g} GB/s disk",
        f"model.placement={ctx.placement} over {ctx.num_gpus} GPU(s); search at the target sparsity on every "
        "gene (compact candidates), serial backend",
        "supernets of later iterations as large as iteration 1's; the local pruner at ~0.65 d_in^3 per level",
        "estimates, not measurements: kernel temporaries, fragmentation and Python's own ~1 GiB are not counted",
    ]


# ---------------------------------------------------------------------------------------------- printing
def format_plan(plan: dict) -> str:
    """The plan as a table (GB = 10^9 bytes; times in minutes and hours)."""

    def gb(n: int) -> str:
        return f"{n / 1e9:.1f}"

    lines = [
        f"tyr plan: {plan['model']} on {plan['hardware']['name']} (estimates; see --json for the assumptions)",
        f"{'phase':<18} {'device GB':>10} {'host GB':>9} {'disk GB':>9} {'time':>10}",
    ]
    for name, p in plan["phases"].items():
        lines.append(
            f"{name:<18} {gb(p['device_bytes']):>10} {gb(p['host_bytes']):>9} {gb(p['disk_bytes']):>9} "
            f"{_duration(p['seconds']):>10}"
        )
    t = plan["totals"]
    lines.append(
        f"{'whole run':<18} {gb(t['device_bytes']):>10} {gb(t['host_bytes']):>9} {gb(t['disk_bytes']):>9} "
        f"{_duration(t['seconds']):>10}   ({t['iterations']} iterations, {t['generations']} generations)"
    )
    for name, p in plan["phases"].items():
        lines += [f"  {name}: {note}" for note in p["notes"]]
    lines.append("fits: " + ("yes" if plan["fits"] else "no"))
    lines += [f"  change: {a}" for a in plan["advice"]]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
