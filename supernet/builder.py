"""Supernet builder (ALGORITHM §3-4): block by block, prune every gene at every level of its ladder.

Streaming: the hidden states of the calibration sequences live in a `HiddenStore` (`supernet.offload`: on the
device, in host RAM or in a memory-mapped file), and the device holds one chunk of `batch_size` sequences at a
time plus one gene's Hessian and pruner state. Every gene makes two passes over the chunks:

1. capture: run the module up to its output projection, add the projection input to H (and to the sums the
   criteria need), drop it;
2. propagate: once the variants exist, run the module again and add the *expected* projection output over the
   variants to the chunk (expectation error accumulation: because the re-fitted projections are linear in their
   weights, this equals running the block once with the weighted average of the variant weights).

Pass 2 recomputes the inputs instead of keeping them: an 8B MLP's inputs over the paper's calibration set are
112 GiB. With offload `none` everything is on the device anyway, so there the inputs of pass 1 are kept for
pass 2. Recomputed inputs are bitwise equal to captured ones, so every offload mode builds the same supernet.

Resume: a finished gene is read back from the store instead of rebuilt (only pass 2 runs for it); its expected
weight is computed from the stored tensors in both cases, so a resumed build is bitwise identical to an
uninterrupted one. A `DeviceLedger` records the bytes held on the device per gene and phase (`build.json`).

Placement: the compute device is the input embedding's. Blocks kept in host RAM (`model.placement: offload`) are
lent to it one at a time, for their two genes; blocks spread over several GPUs (`balanced`) run where they are.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tyr.supernet.criteria import (
    InputStats,
    LevelResult,
    accumulate_stats,
    prune_by_criterion,
    reconstruction_errors,
)
from tyr.supernet.families import ModelAdapter, find_rotary
from tyr.supernet.hidden import HiddenStore, open_hidden_store
from tyr.supernet.ladder import Ladder
from tyr.supernet.ledger import DeviceLedger, nbytes
from tyr.supernet.pruner import PrunerOptions, working_bytes
from tyr.supernet.realise import on_device
from tyr.supernet.store import SupernetStore
from tyr.supernet.units import unit_rows
from tyr.supernet.variant import Gene, Variant

Chunks = list[torch.Tensor]  # projection inputs, one (B, T, d_in) tensor per chunk of calibration sequences
RunModule = Callable[[torch.Tensor], None]  # runs one gene's module (its norm included) on a (B, T, d) chunk


@dataclass(frozen=True)
class BuildPlan:
    """Everything the builder needs besides model, tokens and store (all of it is in the fingerprint)."""

    ladders: Sequence[Ladder]  # one per gene, in genes_of order
    accumulation: str = "expectation"
    attn_options: PrunerOptions = field(default_factory=PrunerOptions)
    mlp_options: PrunerOptions = field(default_factory=lambda: PrunerOptions(num_rounds=16))
    batch_size: int = 8
    storage_dtype: torch.dtype | None = None  # None = the model's dtype
    criterion: str = "tyr"  # supernet/criteria.py
    hessian_tf32: bool = False  # TF32 matmuls for H = sum X^T X on CUDA (changes H; a no-op elsewhere)


@dataclass(frozen=True)
class Offload:
    """Where the build keeps the calibration hidden states (not in the fingerprint: every mode builds the same
    supernet).

    Attributes:
        mode: ``none`` (on the compute device), ``host`` (host RAM, pinned for a GPU) or ``disk`` (a
            memory-mapped file in `directory`); see supernet/hidden.py.
        directory: folder for ``disk``'s file, created by the build and removed when it ends.
    """

    mode: str = "host"
    directory: Path | None = None


@dataclass
class BuildReport:
    genes_built: int = 0
    genes_reused: int = 0
    seconds: float = 0.0
    seconds_pruning: float = 0.0  # Hessian solves and mask selection (the rest is forward passes)
    ledger: dict = field(default_factory=dict)  # device bytes per gene and phase (supernet/ledger.py)


def expectation_weights(sparsities: Sequence[float], mode: str, levels: Sequence[int]) -> list[float]:
    """Weight of each variant in the propagated activations (ALGORITHM §4).

    expectation: w_e ∝ 1 − S_e (density-weighted); uniform_mean: equal; center: level 0 only.
    """
    if mode == "expectation":
        densities = [1.0 - s for s in sparsities]
        total = sum(densities)
        return [d / total for d in densities] if total > 0 else [0.0] * len(densities)
    if mode == "uniform_mean":
        return [1.0 / len(sparsities)] * len(sparsities)
    if mode == "center":
        return [1.0 if lv == 0 else 0.0 for lv in levels]
    raise ValueError(f"no expectation weights for accumulation mode {mode!r}")


def expected_weight(
    variants: Sequence[Variant],
    weights: Sequence[float],
    dense_shape: tuple[int, int],
    group_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Σ_e w_e · W_e with each compact W_e scattered back to the dense (d_out, d_in) layout."""
    total = torch.zeros(dense_shape, dtype=torch.float32, device=device)
    for variant, w in zip(variants, weights, strict=True):
        if w == 0.0 or variant.kept.numel() == 0:
            continue
        cols = unit_rows(variant.kept.to(device), group_size)
        total[:, cols] += w * variant.weight.to(device=device, dtype=torch.float32)
    return total.to(dtype)


def build_supernet(
    model: nn.Module,
    adapter: ModelAdapter,
    tokens: torch.Tensor,
    plan: BuildPlan,
    store: SupernetStore,
    progress: bool = True,
    offload: Offload = Offload(),  # noqa: B008 - frozen, immutable default
) -> BuildReport:
    """Build (or finish building) the supernet for `tokens` (N, T) into `store`, in this process."""
    ledger = DeviceLedger(model.get_input_embeddings().weight.device)
    with torch.inference_mode(), BuildShard(model, adapter, tokens, plan, offload, ledger) as shard:
        report = drive_build(adapter, plan, store, LocalShards(shard), progress, ledger)
    report.ledger = {"offload": offload.mode, "batch_size": plan.batch_size, **ledger.summary()}
    return report


class Shards(Protocol):
    """Where a build's calibration sequences live: one `BuildShard` in this process (`LocalShards`), or one per
    worker of a cluster (tyr/cluster_build.py). `drive_build` sees only these three steps."""

    def capture(self, gene: Gene) -> Any:
        """The gene's input statistics over every sequence (`InputStats`, or a handle to them on a cluster)."""

    def prune(self, ladder: Ladder, stats: Any, store: SupernetStore) -> None:
        """Prune every level of the gene's ladder from `stats` and write the gene into `store`."""

    def propagate(self, ladder: Ladder, store: SupernetStore) -> None:
        """Add the expected output of the gene's variants (in `store`) to every sequence's hidden states."""


def drive_build(
    adapter: ModelAdapter,
    plan: BuildPlan,
    store: SupernetStore,
    shards: Shards,
    progress: bool = True,
    ledger: DeviceLedger | None = None,
) -> BuildReport:
    """The build's loop, gene by gene in block order: a finished gene is kept as the store has it, any other is
    captured, pruned and written; then its expected output is propagated (ALGORITHM §3-4)."""
    start = time.perf_counter()
    report = BuildReport()
    ladders = {(ld.gene.layer, ld.gene.kind): ld for ld in plan.ladders}
    bar = tqdm(range(adapter.num_layers), desc="supernet", unit="block", disable=not progress)
    for i in bar:
        for kind in ("attn", "mlp"):
            bar.set_postfix_str(f"block {i} {kind}")
            ladder = ladders[(i, kind)]
            gene = ladder.gene
            if ledger is not None:
                ledger.begin_gene(gene.name)
            reused = store.is_complete(gene) and store.verify_gene(gene)
            if reused:
                report.genes_reused += 1
            else:
                stats = shards.capture(gene)
                t0 = time.perf_counter()
                shards.prune(ladder, stats, store)
                del stats  # the Hessian is the largest thing a gene holds: gone before the propagation
                report.seconds_pruning += time.perf_counter() - t0
                report.genes_built += 1
            shards.propagate(ladder, store)
            if ledger is not None:
                ledger.end_gene(built=not reused)
    report.seconds = time.perf_counter() - start
    return report


class BuildShard:
    """Calibration sequences and their hidden states, carried through the genes of the build so far: what one
    process of a build holds besides the model (the serial build: every sequence; a Ray build: one worker's
    contiguous share, whole chunks of `plan.batch_size`, so every chunk is the serial build's chunk).

    `capture` gives a gene's input statistics over the shard; `propagate` adds the gene's expected output. Blocks
    kept in host RAM while the device is an accelerator (`model.placement: offload`) are lent to the device from
    the first step on them until a step on another block (or `close`).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        tokens: torch.Tensor,
        plan: BuildPlan,
        offload: Offload,
        ledger: DeviceLedger,
    ):
        embedding = model.get_input_embeddings()
        self.device, dtype = embedding.weight.device, embedding.weight.dtype
        self.adapter, self.plan, self.ledger = adapter, plan, ledger
        self._stack = contextlib.ExitStack()
        self._lent: tuple[int, dict[str, RunModule], contextlib.ExitStack] | None = None
        self._inputs: tuple[Gene, Chunks] | None = None  # the last captured gene's inputs (offload none)
        shape = (tokens.shape[0], tokens.shape[1], adapter.hidden_size)  # (N, T, d)
        try:
            self.hidden = self._stack.enter_context(
                open_hidden_store(offload.mode, shape, dtype, self.device, plan.batch_size, offload.directory)
            )
            with torch.inference_mode():
                _embed(embedding, tokens, self.hidden)
                self._context = _block_context(model, self.hidden)
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> BuildShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._give_back_block()
        self._inputs = None
        self._stack.close()

    def capture(self, gene: Gene) -> InputStats:
        """Pass 1 of `gene` over this shard's sequences (its inputs kept when the hidden states are on the device)."""
        proj = self.adapter.output_proj(gene.layer, gene.kind)
        run_module = self._modules(gene.layer)[gene.kind]
        self.ledger.hold("hidden", self.hidden.device_bytes)
        stats, kept = _input_stats(proj, run_module, self.hidden, self.plan.hessian_tf32, self.ledger)
        self._inputs = (gene, kept) if kept is not None else None
        return stats

    def propagate(self, ladder: Ladder, variants: Sequence[Variant]) -> None:
        """Pass 2 of the gene of `ladder`: add its expected projection output over `variants` to the shard."""
        gene = ladder.gene
        proj = self.adapter.output_proj(gene.layer, gene.kind)
        run_module = self._modules(gene.layer)[gene.kind]
        self.ledger.hold("hidden", self.hidden.device_bytes)
        inputs = self._inputs[1] if self._inputs is not None and self._inputs[0] == gene else None
        self._inputs = None
        weight, bias = _propagation_weight(self.adapter, ladder, proj, variants, self.plan.accumulation)
        _propagate(proj, run_module, self.hidden, weight, bias, inputs, self.ledger)

    def _modules(self, layer: int) -> dict[str, RunModule]:
        """Block `layer`'s two genes as functions of a chunk (the block lent to the device if it lives in RAM)."""
        if self._lent is not None and self._lent[0] == layer:
            return self._lent[1]
        self._give_back_block()
        stack = contextlib.ExitStack()
        block = stack.enter_context(_block_on(self.adapter.layer(layer), self.device, self.ledger))
        self._lent = (layer, dict(_gene_modules(block, *self._context)), stack)
        return self._lent[1]

    def _give_back_block(self) -> None:
        if self._lent is not None:
            self._lent[2].close()
            self._lent = None


class LocalShards:
    """`Shards` of a build in this process: one `BuildShard` holding every sequence; pruning on its device. The
    variants of the gene just written are propagated from memory (the store's bytes: no read back)."""

    def __init__(self, shard: BuildShard):
        self.shard = shard
        self._written: tuple[Gene, list[Variant]] | None = None

    def capture(self, gene: Gene) -> InputStats:
        return self.shard.capture(gene)

    def prune(self, ladder: Ladder, stats: InputStats, store: SupernetStore) -> None:
        s = self.shard
        removed = [ladder.removed(lv) for lv in ladder.levels]
        results, errors = prune_gene(s.adapter, ladder.gene, stats, removed, s.plan, s.ledger)
        self._written = (ladder.gene, write_gene(s.adapter, ladder, results, errors, s.plan, store))

    def propagate(self, ladder: Ladder, store: SupernetStore) -> None:
        gene = ladder.gene
        written, self._written = self._written, None
        if written is not None and written[0] == gene:
            variants = written[1]
        else:
            variants = [store.variant(gene, level) for level in ladder.levels]
        self.shard.propagate(ladder, variants)


def _embed(embedding: nn.Module, tokens: torch.Tensor, hidden: HiddenStore) -> None:
    """The hidden states entering block 0, chunk by chunk."""
    for i in range(hidden.num_chunks):
        a, b = hidden.bounds(i)
        hidden.put(i, embedding(tokens[a:b].to(hidden.device)))  # (B, T, d)


def _block_context(model: nn.Module, hidden: HiddenStore) -> tuple[tuple, torch.Tensor | None]:
    """(rotary (cos, sin), attention mask): the same for every block and chunk."""
    like = hidden.get(0)[:1]  # (1, T, d); the rotary module reads only its dtype and device
    seq_len = hidden.shape[1]
    position_embeddings = find_rotary(model)(like, _position_ids(seq_len, like.device))
    return position_embeddings, _causal_mask(model, seq_len, like)


@contextlib.contextmanager
def _block_on(layer: nn.Module, device: torch.device, ledger: DeviceLedger) -> Iterator[nn.Module]:
    """The block, ready for its genes: a block kept in host RAM while the compute device is an accelerator
    (`model.placement: offload`) is lent to the device for its two genes and given back after; a block that
    lives on a device already (single, balanced) stays where it is."""
    home = next(layer.parameters()).device
    if home.type != "cpu" or device.type == "cpu":
        yield layer
        return
    with on_device(layer, device):
        ledger.hold("block", sum(nbytes(t) for t in (*layer.parameters(), *layer.buffers())))
        yield layer
    ledger.release("block")


def _gene_modules(
    layer: nn.Module, position_embeddings: tuple, mask: torch.Tensor | None
) -> list[tuple[str, RunModule]]:
    """The block's two genes, each with a function that runs its module on a chunk of hidden states.

    The chunk goes to the block's device (a model spread over several GPUs keeps every block on its own one);
    the projection inputs and outputs then live there, and `_propagate` adds the output back where the chunk is.
    """
    device = next(layer.parameters()).device
    position_embeddings = tuple(t.to(device) for t in position_embeddings)
    mask = mask.to(device) if mask is not None else None

    def attention(x: torch.Tensor) -> None:
        layer.self_attn(
            hidden_states=layer.input_layernorm(x.to(device)),
            position_embeddings=position_embeddings,
            attention_mask=mask,
        )

    def mlp(x: torch.Tensor) -> None:
        layer.mlp(layer.post_attention_layernorm(x.to(device)))

    return [("attn", attention), ("mlp", mlp)]


def _input_stats(
    proj: nn.Linear, run_module: RunModule, hidden: HiddenStore, tf32: bool, ledger: DeviceLedger
) -> tuple[InputStats, Chunks | None]:
    """Pass 1: H = sum X^T X (fp32), sum X and the token count over the inputs X of `proj`, chunk by chunk.

    Also returns the inputs themselves when the hidden states are on the device (offload none).
    """
    ledger.phase("capture")
    d_in = proj.in_features
    ledger.hold("stats", d_in * d_in * 4 + d_in * 8)  # H (fp32) and sum X (fp64)
    stats, kept = None, ([] if hidden.on_device else None)
    with _capturing(proj, run_module) as capture:
        for i in range(hidden.num_chunks):
            h = hidden.get(i)  # (B, T, d)
            ledger.hold("chunk", 0 if hidden.on_device else nbytes(h))
            x = capture(h)  # (B, T, d_in)
            # accumulate_stats makes an fp32 copy of X for H (unless X is fp32) and an fp64 one for sum X
            ledger.hold("input", nbytes(x) + x.numel() * (8 + (4 if x.dtype != torch.float32 else 0)))
            with _tf32_matmuls(tf32, x.device):
                stats = accumulate_stats(stats, x)
            ledger.release("chunk", "input")
            if kept is not None:
                kept.append(x)
                ledger.add("inputs", nbytes(x))
    return stats, kept


def prune_gene(
    adapter: ModelAdapter,
    gene: Gene,
    stats: InputStats,
    removed: Sequence[int],
    plan: BuildPlan,
    ledger: DeviceLedger | None = None,
) -> tuple[list[LevelResult], list[float]]:
    """Prune the gene's dense projection once per removal count from its input statistics (on the device of
    `stats`); each level's result and its relative reconstruction error. Levels are independent of each other,
    so any subset of a ladder gives those levels' results exactly (a cluster prunes a gene's levels in parallel).
    """
    proj = adapter.output_proj(gene.layer, gene.kind)
    options = plan.attn_options if gene.kind == "attn" else plan.mlp_options
    if ledger is not None:
        ledger.phase("prune")
        ledger.hold("pruner", working_bytes(proj.in_features, proj.out_features, options))
    group_size = adapter.group_size(gene.kind)
    results = prune_by_criterion(plan.criterion, stats, proj.weight.T, group_size, removed, options)
    errors = reconstruction_errors(stats, proj.weight.T, results, group_size)
    if ledger is not None:
        ledger.release("pruner", "stats")
    return results, errors


def level_variants(
    adapter: ModelAdapter,
    ladder: Ladder,
    levels: Sequence[int],
    results: Sequence[LevelResult],
    plan: BuildPlan,
) -> list[Variant]:
    """Pruned `levels` of the gene as variants: on the CPU, in the storage dtype."""
    gene = ladder.gene
    dtype = plan.storage_dtype or adapter.output_proj(gene.layer, gene.kind).weight.dtype
    return [
        Variant(
            gene,
            level,
            ladder.sparsity(level),
            r.kept.cpu().to(torch.int64),
            r.weight.T.contiguous().to(device="cpu", dtype=dtype),
            key="",
            bias=None if r.bias is None else r.bias.to(device="cpu", dtype=dtype),
        )
        for level, r in zip(levels, results, strict=True)
    ]


def write_gene(
    adapter: ModelAdapter,
    ladder: Ladder,
    results: Sequence[LevelResult],
    errors: Sequence[float],
    plan: BuildPlan,
    store: SupernetStore,
) -> list[Variant]:
    """The gene's variants written to the store (every level's file, then the gene's record)."""
    gene = ladder.gene
    proj = adapter.output_proj(gene.layer, gene.kind)
    variants = level_variants(adapter, ladder, ladder.levels, results, plan)
    params = [variant_params(adapter, proj, v) for v in variants]
    store.write_gene(ladder, adapter.group_size(gene.kind), variants, params, list(errors))
    return variants


def _propagate(
    proj: nn.Linear,
    run_module: RunModule,
    hidden: HiddenStore,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inputs: Chunks | None,
    ledger: DeviceLedger,
) -> None:
    """Pass 2: h += X W^T + b in every chunk, with (W, b) the expected projection and X the inputs pass 1 kept,
    or recomputed by running the module again."""
    ledger.phase("propagate")
    ledger.hold("expected_weight", nbytes(weight))
    with _capturing(proj, run_module) as capture:
        for i in range(hidden.num_chunks):
            h = hidden.get(i)  # (B, T, d)
            x = inputs[i] if inputs is not None else capture(h)  # (B, T, d_in)
            out = F.linear(x, weight, bias)  # (B, T, d)
            staged = 0 if hidden.on_device else nbytes(h) + nbytes(x)
            ledger.hold("chunk", staged + nbytes(out))
            hidden.put(i, h.add_(out.to(h.device)))  # from the block's device (balanced placement)
            ledger.release("chunk")
    ledger.release("inputs", "expected_weight")


def variant_params(adapter: ModelAdapter, proj: nn.Linear, variant: Variant) -> int:
    """Exact prunable parameters of the module at this variant; a compensation bias on a bias-free
    projection (FLAP) adds d_out parameters."""
    extra = proj.out_features if variant.bias is not None and proj.bias is None else 0
    return adapter.module_params(variant.gene.kind, variant.kept.tolist()) + extra


def _propagation_weight(
    adapter: ModelAdapter, ladder: Ladder, proj: nn.Linear, variants: Sequence[Variant], mode: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output-projection weight and bias whose output is propagated to the next module."""
    if mode == "none":  # dense activations: the official code's behaviour (ALGORITHM §4 pitfall)
        return proj.weight, proj.bias
    sparsities = [v.sparsity for v in variants]
    weights = expectation_weights(sparsities, mode, ladder.levels)
    weight = expected_weight(
        variants,
        weights,
        tuple(proj.weight.shape),
        adapter.group_size(ladder.gene.kind),
        proj.weight.dtype,
        proj.weight.device,
    )
    return weight, expected_bias(variants, weights, proj)


def expected_bias(
    variants: Sequence[Variant], weights: Sequence[float], proj: nn.Linear
) -> torch.Tensor | None:
    """The dense bias plus the weighted average of the variants' compensation biases (None if neither)."""
    if all(v.bias is None for v in variants):
        return proj.bias
    total = torch.zeros(proj.out_features, dtype=torch.float32, device=proj.weight.device)
    if proj.bias is not None:
        total += proj.bias.float()
    for variant, w in zip(variants, weights, strict=True):
        if variant.bias is not None and w != 0.0:
            total += w * variant.bias.to(device=total.device, dtype=torch.float32)
    return total.to(proj.weight.dtype)


class _InputCaptured(Exception):
    """Raised by the capture hook: the projection is the module's last op, so its dense output is never needed."""


@contextlib.contextmanager
def _capturing(proj: nn.Linear, run_module: RunModule) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """A function h -> the input of `proj` when its module runs on h (the forward stops right before `proj`)."""
    captured: Chunks = []

    def hook(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach())  # a fresh tensor: the forward is aborted right after
        raise _InputCaptured

    def capture(h: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(_InputCaptured):
            run_module(h)
        if not captured:
            raise RuntimeError(
                f"{type(proj).__name__} was not called by its module; unsupported module layout"
            )
        return captured.pop()

    handle = proj.register_forward_pre_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()


@contextlib.contextmanager
def _tf32_matmuls(enabled: bool, device: torch.device) -> Iterator[None]:
    """TF32 for the fp32 matmuls inside the block, on CUDA only (elsewhere nothing changes).

    Scoped to the Hessian accumulation: the model's own forward passes (of an fp32 model too) never see it.
    """
    if not enabled or device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has fp32_precision and refuses a mix of it and the older allow_tf32: use one of them.
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    old = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, old)


def _position_ids(seq_len: int, device: torch.device) -> torch.Tensor:
    return torch.arange(seq_len, device=device)[None]  # (1, T); broadcast over the batch


def _causal_mask(model: nn.Module, seq_len: int, like: torch.Tensor) -> torch.Tensor | None:
    """None lets SDPA/flash kernels apply causality; eager attention needs an explicit additive mask."""
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if impl == "sdpa" or "flash" in impl:
        return None
    blocked = torch.ones(seq_len, seq_len, dtype=torch.bool, device=like.device).triu(1)
    mask = torch.zeros(seq_len, seq_len, dtype=like.dtype, device=like.device)
    return mask.masked_fill(blocked, torch.finfo(like.dtype).min)[None, None]
