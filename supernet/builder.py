"""Supernet builder (ALGORITHM §3-4): block by block, prune every gene at every level of its ladder.

Streaming: memory holds the model, the current hidden states of the calibration sequences, and one gene's
captured projection inputs and Hessian. Block l+1 sees the *expected* output of block l over its variants
(expectation error accumulation); because the re-fitted projections are linear in their weights, this equals
running the block once with the weighted average of the variant weights.

Resume: a finished gene is read back from the store instead of rebuilt; its expected weight is computed from
the stored tensors in both cases, so a resumed build is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tyr.supernet.criteria import accumulate_stats, prune_by_criterion, reconstruction_errors
from tyr.supernet.families import ModelAdapter, find_rotary
from tyr.supernet.ladder import Ladder
from tyr.supernet.pruner import PrunerOptions
from tyr.supernet.store import SupernetStore
from tyr.supernet.units import unit_rows
from tyr.supernet.variant import Variant

Chunks = list[torch.Tensor]  # hidden states or projection inputs, one (B, T, d) tensor per calibration batch


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


@dataclass
class BuildReport:
    genes_built: int = 0
    genes_reused: int = 0
    seconds: float = 0.0
    seconds_pruning: float = 0.0  # Hessian solves and mask selection (the rest is forward passes)


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
) -> BuildReport:
    """Build (or finish building) the supernet for `tokens` (N, T) into `store`."""
    start = time.perf_counter()
    report = BuildReport()
    ladders = {(ld.gene.layer, ld.gene.kind): ld for ld in plan.ladders}
    with torch.inference_mode():
        hidden = _embed(model, tokens, plan.batch_size)
        position_embeddings = find_rotary(model)(
            hidden[0][:1], _position_ids(tokens.shape[1], hidden[0].device)
        )
        mask = _causal_mask(model, tokens.shape[1], hidden[0])
        bar = tqdm(range(adapter.num_layers), desc="supernet", unit="block", disable=not progress)
        for i in bar:
            layer = adapter.layer(i)

            def attention(x: torch.Tensor, layer=layer) -> None:
                layer.self_attn(
                    hidden_states=layer.input_layernorm(x),
                    position_embeddings=position_embeddings,
                    attention_mask=mask,
                )

            def mlp(x: torch.Tensor, layer=layer) -> None:
                layer.mlp(layer.post_attention_layernorm(x))

            for kind, run_module in (("attn", attention), ("mlp", mlp)):
                bar.set_postfix_str(f"block {i} {kind}")
                hidden = _process_gene(adapter, ladders[(i, kind)], run_module, hidden, plan, store, report)
    report.seconds = time.perf_counter() - start
    return report


def _process_gene(
    adapter: ModelAdapter,
    ladder: Ladder,
    run_module: Callable[[torch.Tensor], None],
    hidden: Chunks,
    plan: BuildPlan,
    store: SupernetStore,
    report: BuildReport,
) -> Chunks:
    """Capture the gene's projection inputs, get its variants (built or stored), propagate the block."""
    gene = ladder.gene
    proj = adapter.output_proj(gene.layer, gene.kind)
    inputs = _capture_inputs(proj, run_module, hidden)
    if store.is_complete(gene) and store.verify_gene(gene):
        variants = [store.variant(gene, level) for level in ladder.levels]
        report.genes_reused += 1
    else:
        t0 = time.perf_counter()
        variants = _build_gene(adapter, ladder, proj, inputs, plan, store)
        report.seconds_pruning += time.perf_counter() - t0
        report.genes_built += 1
    weight, bias = _propagation_weight(adapter, ladder, proj, variants, plan.accumulation)
    return [h + F.linear(x, weight, bias) for h, x in zip(hidden, inputs, strict=True)]


def _build_gene(
    adapter: ModelAdapter,
    ladder: Ladder,
    proj: nn.Linear,
    inputs: Chunks,
    plan: BuildPlan,
    store: SupernetStore,
) -> list[Variant]:
    gene = ladder.gene
    stats = None
    for x in inputs:
        stats = accumulate_stats(stats, x)  # H = sum X^T X (fp32), sum X and token count
    options = plan.attn_options if gene.kind == "attn" else plan.mlp_options
    group_size = adapter.group_size(gene.kind)
    removed = [ladder.removed(level) for level in ladder.levels]
    results = prune_by_criterion(plan.criterion, stats, proj.weight.T, group_size, removed, options)
    errors = reconstruction_errors(stats, proj.weight.T, results, group_size)
    dtype = plan.storage_dtype or proj.weight.dtype
    variants = [
        Variant(
            gene,
            level,
            ladder.sparsity(level),
            r.kept.cpu().to(torch.int64),
            r.weight.T.contiguous().to(device="cpu", dtype=dtype),
            key="",
            bias=None if r.bias is None else r.bias.to(device="cpu", dtype=dtype),
        )
        for level, r in zip(ladder.levels, results, strict=True)
    ]
    params = [variant_params(adapter, proj, v) for v in variants]
    store.write_gene(ladder, group_size, variants, params, errors)
    return variants


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


def _capture_inputs(proj: nn.Linear, run_module: Callable[[torch.Tensor], None], hidden: Chunks) -> Chunks:
    """Inputs of `proj` while running its module on every chunk of hidden states (stops right before `proj`)."""
    captured: Chunks = []

    def hook(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach())  # a fresh tensor: the forward is aborted right after
        raise _InputCaptured

    handle = proj.register_forward_pre_hook(hook)
    try:
        for h in hidden:
            with contextlib.suppress(_InputCaptured):
                run_module(h)
    finally:
        handle.remove()
    if len(captured) != len(hidden):
        raise RuntimeError(f"{type(proj).__name__} was not called by its module; unsupported module layout")
    return captured


def _embed(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> Chunks:
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    return [embedding(tokens[i : i + batch_size].to(device)) for i in range(0, tokens.shape[0], batch_size)]


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
