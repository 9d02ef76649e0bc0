"""The unit of the supernet: one gene pruned at one level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

GeneKind = Literal["attn", "mlp"]
GENE_KINDS: tuple[GeneKind, GeneKind] = ("attn", "mlp")


@dataclass(frozen=True)
class Gene:
    """One prunable module: a block's attention (unit = query head) or MLP (unit = channel)."""

    layer: int
    kind: GeneKind

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.kind}"


def genes_of(num_layers: int) -> list[Gene]:
    """Canonical gene order used everywhere (genomes, manifests): layer-major, attention before MLP."""
    return [Gene(layer, kind) for layer in range(num_layers) for kind in GENE_KINDS]


@dataclass(frozen=True, eq=False)
class Variant:
    """A gene pruned at one level of its ladder, stored compactly.

    Attributes:
        gene: which module.
        level: ladder level (0 = centre, +1 = one step sparser).
        sparsity: fraction of the module's units removed.
        kept: sorted indices of kept units (query heads or MLP channels), int64.
        weight: re-fitted output-projection columns for the kept units, (d_out, num_kept * group_size);
            group_size is head_dim for attention, 1 for MLP.
        key: identity of the variant (content hash); equal keys mean equal tensors.
        bias: optional (d_out,) output bias added by the criterion (FLAP's compensation of removed units).
    """

    gene: Gene
    level: int
    sparsity: float
    kept: torch.Tensor  # (num_kept,) int64
    weight: torch.Tensor  # (d_out, num_kept * group_size)
    key: str
    bias: torch.Tensor | None = None  # (d_out,)
