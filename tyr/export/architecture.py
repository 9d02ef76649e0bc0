"""What a genome keeps per decoder layer, and ``architecture.json`` computed from it.

Written once for both callers: ``tyr run`` (``tyr.pipeline.architecture``, from a supernet's manifest) and
``tyr export`` (from the genome's variants).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tyr.errors import TyrError

if TYPE_CHECKING:
    from torch import nn

    from tyr.supernet.families import ModelAdapter
    from tyr.supernet.variant import Variant

ARCHITECTURE_FILE = "architecture.json"


@dataclass(frozen=True)
class LayerShape:
    """What one decoder layer keeps (indices into the dense model's heads / KV heads / channels)."""

    kept_heads: tuple[int, ...]
    kept_kv_heads: tuple[int, ...]
    kv_index: tuple[int, ...]  # per kept query head: position of its KV head among kept_kv_heads
    kept_channels: tuple[int, ...]
    # A compensation bias (FLAP criterion) on an output projection that has none in the dense model.
    o_bias: bool = False
    down_bias: bool = False


def layer_shapes(adapter: ModelAdapter, variants: Sequence[Variant | None]) -> list[LayerShape]:
    """Per layer, the kept units of a genome (one Variant per gene in ``genes_of`` order; None = dense)."""
    from tyr.supernet.variant import genes_of

    genes = genes_of(adapter.num_layers)
    if len(variants) != len(genes):
        raise TyrError(
            f"genome has {len(variants)} genes but the model has {len(genes)} "
            f"({adapter.num_layers} layers x attn, mlp)"
        )
    kept = [_kept(v, adapter.num_units(g.kind)) for g, v in zip(genes, variants)]
    return genome_shapes(adapter, kept, [v is not None and v.bias is not None for v in variants])


def genome_shapes(
    adapter: ModelAdapter, kept: Sequence[Sequence[int]], adds_bias: Sequence[bool]
) -> list[LayerShape]:
    """Per layer, what a genome keeps, given each gene's kept units (``genes_of`` order) and whether its
    variant adds an output bias (FLAP); a bias the dense projection already has adds nothing."""
    if not len(kept) == len(adds_bias) == 2 * adapter.num_layers:
        raise TyrError(
            f"a genome of {adapter.num_layers} layers has {2 * adapter.num_layers} genes, got {len(kept)}"
        )
    units = adapter.units("attn")
    shapes = []
    for i in range(adapter.num_layers):
        heads = tuple(int(h) for h in kept[2 * i])
        shapes.append(
            LayerShape(
                heads,
                tuple(units.kept_kv_heads(heads)),
                tuple(units.kv_index(heads)),
                tuple(int(c) for c in kept[2 * i + 1]),
                o_bias=bool(adds_bias[2 * i]) and not adapter.o_bias,
                down_bias=bool(adds_bias[2 * i + 1]) and not adapter.mlp_bias,
            )
        )
    return shapes


def _kept(variant: Variant | None, num_units: int) -> tuple[int, ...]:
    if variant is None:
        return tuple(range(num_units))
    return tuple(int(k) for k in variant.kept.tolist())


def has_added_biases(shapes: Sequence[LayerShape]) -> bool:
    return any(s.o_bias or s.down_bias for s in shapes)


def is_uniform(shapes: Sequence[LayerShape]) -> bool:
    """True when a stock config describes the model: same counts everywhere, even GQA groups, no empty layer."""
    if has_added_biases(shapes):  # stock configs cannot give only some output projections a bias
        return False
    first = shapes[0]
    n_q, n_kv, n_ch = len(first.kept_heads), len(first.kept_kv_heads), len(first.kept_channels)
    if n_q == 0 or n_ch == 0 or n_q % n_kv:
        return False
    group = n_q // n_kv
    even = tuple(j // group for j in range(n_q))
    return all(
        (len(s.kept_heads), len(s.kept_kv_heads), len(s.kept_channels)) == (n_q, n_kv, n_ch)
        and s.kv_index == even
        for s in shapes
    )


def compute_architecture(
    model: nn.Module,
    adapter: ModelAdapter,
    shapes: Sequence[LayerShape],
    base_model: str | None = None,
    target_sparsity: float | None = None,
) -> dict:
    """``architecture.json`` for per-layer kept units, with exact parameter counts.

    ``base_model`` defaults to the model's ``name_or_path``; ``target_sparsity`` to the achieved one.
    """
    layers, prunable_pruned = [], 0
    for i, s in enumerate(shapes):
        prunable_pruned += adapter.attention_params(s.kept_heads) + adapter.mlp_params(len(s.kept_channels))
        prunable_pruned += adapter.hidden_size * (int(s.o_bias) + int(s.down_bias))
        layers.append(
            {
                "index": i,
                "attention": {"kept_heads": list(s.kept_heads), "kept_kv_heads": list(s.kept_kv_heads)},
                "mlp": {"kept_channels_count": len(s.kept_channels), "kept_channels": list(s.kept_channels)},
            }
        )
    dense = sum(p.numel() for p in model.parameters())
    prunable_dense = adapter.dense_prunable_params()
    achieved = 1.0 - prunable_pruned / prunable_dense
    return {
        "base_model": base_model if base_model is not None else model_name_or_path(model),
        "model_type": adapter.model_type,
        "target_sparsity": target_sparsity if target_sparsity is not None else achieved,
        "achieved_sparsity": achieved,
        "params": {
            "dense": dense,
            "pruned": dense - prunable_dense + prunable_pruned,
            "prunable_dense": prunable_dense,
            "prunable_pruned": prunable_pruned,
        },
        "layers": layers,
    }


def model_name_or_path(model: nn.Module) -> str:
    """The name or path the model was loaded from ("" when unknown)."""
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")


def check_architecture(architecture: dict, shapes: Sequence[LayerShape]) -> None:
    """Refuse an ``architecture.json`` whose kept heads / channels differ from the genome's."""
    layers = architecture.get("layers") if isinstance(architecture, dict) else None
    if not isinstance(layers, list) or len(layers) != len(shapes):
        raise TyrError(
            f"architecture describes {len(layers) if isinstance(layers, list) else 'no'} layers, "
            f"the genome {len(shapes)}"
        )
    for i, (entry, s) in enumerate(zip(layers, shapes)):
        try:
            heads = tuple(entry["attention"]["kept_heads"])
            channels = tuple(entry["mlp"]["kept_channels"])
        except (KeyError, TypeError):
            raise TyrError(f"architecture layer {i} lacks attention.kept_heads / mlp.kept_channels") from None
        if heads != s.kept_heads or channels != s.kept_channels:
            raise TyrError(
                f"architecture layer {i} keeps other units than the genome's variants; "
                "the run directory is inconsistent (re-run `tyr run` to rebuild final/)"
            )
