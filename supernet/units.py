"""The pruning unit: what removing one query head or one MLP channel slices, written down once.

A gene's units are groups of ``group_size`` consecutive input columns of its output projection:

* attention (unit = query head ``h``, ``group_size = head_dim``): columns ``[h*hd, (h+1)*hd)`` of ``o_proj``
  and the same rows of ``q_proj``. Head ``h`` reads KV head ``g = h // heads_per_kv``; rows
  ``[g*hd, (g+1)*hd)`` of ``k_proj`` and ``v_proj`` go only when *none* of ``g``'s query heads is kept.
  Per-head norms (qwen3's ``q_norm``/``k_norm``) act on ``head_dim`` and are not sliced.
* MLP (unit = intermediate channel ``c``, ``group_size = 1``): column ``c`` of ``down_proj`` and row ``c`` of
  ``gate_proj`` and ``up_proj``.

Input projections (q/k/v, gate/up) are sliced along their output rows (weight and bias); the output
projection (o/down) along its input columns; its bias stays whole. Everything that slices — realisation,
export, the builder's expectation, criteria, the local pruner and parameter counts — goes through here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tyr.supernet.variant import GeneKind

Slices = dict[str, tuple[int, torch.Tensor]]  # projection name -> (dim, indices along dim)


def unit_rows(units: torch.Tensor, group_size: int) -> torch.Tensor:
    """Flat indices of the given units, each unit being ``group_size`` consecutive indices (unit order kept)."""
    units = units.to(torch.int64)
    offsets = torch.arange(group_size, dtype=torch.int64, device=units.device)
    return (units[:, None] * group_size + offsets).reshape(-1)


def _as_list(units: Iterable[int]) -> list[int]:
    if hasattr(units, "tolist"):
        return [int(u) for u in units.tolist()]
    return [int(u) for u in units]


@dataclass(frozen=True)
class UnitLayout:
    """How the units of one module kind map onto its projections.

    Attributes:
        kind: "attn" (units are query heads) or "mlp" (units are channels).
        num_units: query heads or intermediate channels of the dense module.
        group_size: input columns of the output projection per unit (head_dim, or 1).
        num_kv_heads: KV heads of the dense attention (0 for the MLP).
    """

    kind: GeneKind
    num_units: int
    group_size: int
    num_kv_heads: int = 0

    @classmethod
    def attention(cls, num_heads: int, num_kv_heads: int, head_dim: int) -> UnitLayout:
        return cls("attn", num_heads, head_dim, num_kv_heads)

    @classmethod
    def mlp(cls, intermediate_size: int) -> UnitLayout:
        return cls("mlp", intermediate_size, 1)

    @property
    def heads_per_kv(self) -> int:
        return self.num_units // self.num_kv_heads

    # ---- attention: KV groups ---------------------------------------------------------------------------
    def kv_head_of(self, head: int) -> int:
        return int(head) // self.heads_per_kv

    def kept_kv_heads(self, kept: Iterable[int]) -> list[int]:
        """KV heads still read by some kept query head, ascending."""
        if self.kind != "attn":
            return []
        return sorted({self.kv_head_of(h) for h in _as_list(kept)})

    def kv_index(self, kept: Iterable[int]) -> list[int]:
        """Per kept query head, the position of its KV head among `kept_kv_heads(kept)`."""
        kept = _as_list(kept)
        position = {kv: j for j, kv in enumerate(self.kept_kv_heads(kept))}
        return [position[self.kv_head_of(h)] for h in kept]

    # ---- slices -----------------------------------------------------------------------------------------
    def columns(self, kept: Iterable[int] | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Output-projection columns of the kept units (= their q_proj, or gate/up_proj, rows)."""
        return unit_rows(torch.as_tensor(_as_list(kept), dtype=torch.int64, device=device), self.group_size)

    def kv_rows(self, kept: Iterable[int], device: torch.device | None = None) -> torch.Tensor:
        """k_proj / v_proj rows of the KV heads that `kept` still reads."""
        kv = torch.as_tensor(self.kept_kv_heads(kept), dtype=torch.int64, device=device)
        return unit_rows(kv, self.group_size)

    def slices(self, kept: Iterable[int], device: torch.device | None = None) -> Slices:
        """What a module keeps: per projection, the dimension it is sliced along and the kept indices."""
        kept = _as_list(kept)
        cols = self.columns(kept, device)
        if self.kind == "mlp":
            return {"gate_proj": (0, cols), "up_proj": (0, cols), "down_proj": (1, cols)}
        kv = self.kv_rows(kept, device)
        return {"q_proj": (0, cols), "k_proj": (0, kv), "v_proj": (0, kv), "o_proj": (1, cols)}

    def dropped_rows(self, kept: Iterable[int]) -> dict[str, torch.Tensor]:
        """Rows of the input projections that pruning to `kept` removes (zeroed by the dense-masked export)."""
        keep = self.slices(kept)
        out = {}
        for name, (dim, indices) in keep.items():
            if dim != 0:
                continue
            total = (
                self.num_units * self.group_size
                if name not in ("k_proj", "v_proj")
                else (self.num_kv_heads * self.group_size)
            )
            mask = torch.ones(total, dtype=torch.bool)
            mask[indices] = False
            out[name] = mask.nonzero().flatten()
        return out

    # ---- sizes ------------------------------------------------------------------------------------------
    def params(self, kept: Iterable[int], hidden_size: int, in_bias: bool, out_bias: bool) -> int:
        """Weights and biases of the module's projections when only `kept` units remain.

        Input projections (q/k/v or gate/up) have `in_bias`; the output projection's bias (`out_bias`) has
        hidden_size entries and always stays.
        """
        kept = _as_list(kept)
        rows = len(kept) * self.group_size  # q rows, or gate rows (= up rows)
        if self.kind == "attn":
            rows_in = rows + 2 * len(self.kept_kv_heads(kept)) * self.group_size
        else:
            rows_in = 2 * rows
        return rows_in * (hidden_size + int(in_bias)) + hidden_size * rows + hidden_size * int(out_bias)
