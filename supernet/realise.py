"""Apply a genome (one Variant per gene) to a loaded model, and take it back off.

Two modes:

* ``masked``: shapes stay dense; each output projection (o_proj / down_proj) is overwritten with zeros except
  the kept unit columns, which receive the variant's re-fitted weight. Pruned units then contribute exactly
  nothing. Cheap to switch, forward cost unchanged.
* ``compact``: modules are physically sliced so forward cost scales with the kept parameters. The MLP's
  gate/up/down children are replaced by sliced ``nn.Linear``; the whole ``self_attn`` is replaced by a
  :class:`CompactAttention`. The dense originals are held by the :class:`Realiser`, so switching back and
  re-slicing always start from the dense weights.

The two modes compute the same function (up to float rounding); ``restore_dense`` is bitwise exact in both.

Placement (``model.placement``): every slice is taken on the dense module's own device and every re-fitted weight
is put there, so a model spread over several GPUs gets each compact module beside the block it replaces, and a
model whose blocks live in host RAM (offload) gets compact modules in host RAM too; `on_device` lends a block,
dense or compact, to the compute device while it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tyr.errors import TyrError
from tyr.supernet.families import ModelAdapter, adapter_for
from tyr.supernet.variant import Gene, Variant, genes_of

Mode = Literal["masked", "compact"]
MODES: tuple[Mode, Mode] = ("masked", "compact")


def same_device(a: torch.device, b: torch.device) -> bool:
    """True when `a` and `b` name the same device; ``cuda`` without an index matches any CUDA device."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """Lend `module` (a decoder block kept in host RAM, ``model.placement: offload``) to `device` for a while.

    Device copies of its parameters and buffers take their places; on exit the originals come back, untouched:
    nothing is copied back, because forward passes and the supernet build only read weights (realise genomes
    outside this context). The originals stay where they live, so a `Realiser` keeps slicing them in place, and
    whatever children the module holds at entry (dense or compact) travel with it. A tensor shared by two
    submodules gets one copy; tensors already on `device` are not copied.
    """
    device = torch.device(device)
    swapped: list[tuple[dict, str, torch.Tensor]] = []  # (owner's table, name, original)
    copies: dict[int, torch.Tensor] = {}
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or same_device(tensor.device, device):
                    continue
                if id(tensor) not in copies:
                    moved = tensor.detach().to(device, non_blocking=True)
                    if isinstance(tensor, nn.Parameter):
                        moved = nn.Parameter(moved, requires_grad=tensor.requires_grad)
                    copies[id(tensor)] = moved
                swapped.append((table, name, tensor))
                table[name] = copies[id(tensor)]
    try:
        yield module
    finally:
        for table, name, tensor in reversed(swapped):
            table[name] = tensor


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool = False) -> nn.Linear:
    """An ``nn.Linear`` owning exactly ``weight``/``bias`` (no random init, zero-sized shapes allowed)."""
    lin = nn.Linear(1, 1, bias=bias is not None, device="meta")
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return lin


def _rows(lin: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """A copy of ``lin`` keeping only output rows ``rows`` (weight and bias)."""
    with torch.no_grad():
        weight = lin.weight.index_select(0, rows)
        bias = lin.bias.index_select(0, rows) if lin.bias is not None else None
    return _linear(weight, bias, lin.weight.requires_grad)


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach().clone() if t is not None else None


def _fitted(variant: Variant, like: nn.Linear) -> torch.Tensor:
    return variant.weight.detach().to(device=like.weight.device, dtype=like.weight.dtype).clone()


def _output_bias(dense_bias: torch.Tensor | None, variant: Variant, like: nn.Linear) -> torch.Tensor | None:
    """The pruned projection's bias: the dense bias plus the variant's compensation bias (FLAP), if any."""
    if variant.bias is None:
        return dense_bias.detach().clone() if dense_bias is not None else None
    extra = variant.bias.detach().to(device=like.weight.device, dtype=like.weight.dtype)
    return extra.clone() if dense_bias is None else dense_bias.detach() + extra


class CompactAttention(nn.Module):
    """Self-attention with only some query heads and the KV heads they use.

    Query head ``j`` (of the kept ones) attends with KV head ``kv_index[j]`` (of the kept KV heads), so any number
    of query heads per KV group works. Call signature matches the HF attention module as called by the decoder
    layer; returns ``(attn_output, None)``.
    """

    def __init__(
        self,
        q_proj: nn.Linear,
        k_proj: nn.Linear,
        v_proj: nn.Linear,
        o_proj: nn.Linear,
        kv_index: torch.Tensor,
        head_dim: int,
        scaling: float,
        rotary_fn: Callable,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        dropout: float = 0.0,
        layer_idx: int | None = None,
        kept_heads: Sequence[int] = (),
    ):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        self.register_buffer("kv_index", kv_index, persistent=False)
        self.num_heads = int(kv_index.numel())
        self.num_kv_heads = k_proj.out_features // head_dim
        self._identity_kv = self.num_heads == self.num_kv_heads  # one query head per kept KV head
        self.head_dim = head_dim
        self.scaling = scaling
        self.rotary_fn = rotary_fn
        self.attention_dropout = dropout
        self.layer_idx = layer_idx
        self.is_causal = True
        self.kept_heads = tuple(int(h) for h in kept_heads)

    @classmethod
    def from_dense(
        cls,
        attn: nn.Module,
        adapter: ModelAdapter,
        kept: torch.Tensor,
        o_weight: torch.Tensor,
        o_bias: torch.Tensor | None = None,
    ) -> CompactAttention:
        """Slice the dense HF attention ``attn`` to query heads ``kept``; ``o_weight`` (and ``o_bias`` if given,
        else the dense one) become o_proj's parameters."""
        units = adapter.units("attn")
        kept_list = [int(h) for h in kept.tolist()]
        device = attn.q_proj.weight.device
        kv_index = torch.tensor(units.kv_index(kept_list), dtype=torch.long, device=device)
        q_rows = units.columns(kept_list, device)
        kv_rows = units.kv_rows(kept_list, device)
        o = attn.o_proj
        o_proj = _linear(o_weight, o_bias if o_bias is not None else _copy(o.bias), o.weight.requires_grad)
        return cls(
            q_proj=_rows(attn.q_proj, q_rows),
            k_proj=_rows(attn.k_proj, kv_rows),
            v_proj=_rows(attn.v_proj, kv_rows),
            o_proj=o_proj,
            kv_index=kv_index,
            head_dim=adapter.head_dim,
            scaling=float(attn.scaling),
            rotary_fn=adapter.rotary_fn(),
            q_norm=getattr(attn, "q_norm", None) if adapter.qk_norm else None,
            k_norm=getattr(attn, "k_norm", None) if adapter.qk_norm else None,
            dropout=float(getattr(attn, "attention_dropout", 0.0)),
            layer_idx=getattr(attn, "layer_idx", None),
            kept_heads=kept_list,
        )

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if cache is not None or kwargs.get("past_key_values") is not None:
            raise TyrError(
                "a compact (pruned) attention cannot use a KV cache; call the model with use_cache=False"
            )
        input_shape = hidden_states.shape[:-1]
        if self.num_heads == 0:  # fully pruned: the output is o_proj's bias (or zeros)
            return self.o_proj(hidden_states.new_zeros(*input_shape, 0)), None
        if position_embeddings is None:
            raise TyrError(
                "CompactAttention needs position_embeddings=(cos, sin) from the model's rotary_emb"
            )

        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self.rotary_fn(q, k, cos, sin)
        if not self._identity_kv:  # gather each kept query head's KV head
            k = k.index_select(1, self.kv_index)
            v = v.index_select(1, self.kv_index)

        mask = attention_mask
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
                raise TyrError(
                    "compact attention needs a 4-D attention mask or none; load the model with "
                    "attn_implementation='sdpa' or 'eager'"
                )
            if mask.dtype != torch.bool and mask.dtype != q.dtype:
                mask = mask.to(q.dtype)
        is_causal = mask is None and q.shape[2] > 1
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            scale=self.scaling,
            is_causal=is_causal,
        )
        out = out.transpose(1, 2).reshape(*input_shape, -1)
        return self.o_proj(out), None


class Realiser:
    """Puts genomes on a model, touching only the genes whose variant changed since the last ``apply``.

    One Realiser per model: it captures the dense modules at construction, so build it on the dense model.

    Attributes:
        swaps: total number of gene swaps done (a gene swapped to its dense form counts too).
        keys: per gene (``genes_of`` order), the key of the applied variant, or None when dense.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter | None = None, mode: Mode = "masked"):
        if mode not in MODES:
            raise TyrError(f"unknown realise mode {mode!r}; expected one of {', '.join(MODES)}")
        self.model = model
        self.adapter = adapter if adapter is not None else adapter_for(model)
        self.mode: Mode = mode
        self.genes: list[Gene] = genes_of(self.adapter.num_layers)
        self.keys: list[str | None] = [None] * len(self.genes)
        self.swaps = 0
        self._check_real_weights()
        if mode == "compact":
            self._check_compact_supported()
        # compact: the dense modules, to put back and to slice from
        self._dense_attn = [self.adapter.layer(i).self_attn for i in range(self.adapter.num_layers)]
        self._dense_mlp = [
            (m.gate_proj, m.up_proj, m.down_proj)
            for m in (self.adapter.layer(i).mlp for i in range(self.adapter.num_layers))
        ]
        # masked: private copies of dense output-projection weights (and the bias parameters, possibly None),
        # taken when a gene is first overwritten
        self._dense_out: dict[int, torch.Tensor] = {}
        self._dense_bias: dict[int, nn.Parameter | None] = {}

    def _check_real_weights(self) -> None:
        """Slices are taken from the dense weights where they live; accelerate's disk/CPU offload leaves
        placeholders (meta tensors) in the blocks instead, which cannot be sliced."""
        for i in range(self.adapter.num_layers):
            if any(p.device.type == "meta" for p in self.adapter.layer(i).parameters()):
                raise TyrError(
                    f"block {i} has no weights in memory (meta tensors: offloaded by accelerate); load the model "
                    "with model.placement single, balanced or offload (Tyr's own), not an accelerate offload map"
                )

    def _check_compact_supported(self) -> None:
        config = self.model.config
        impl = getattr(config, "_attn_implementation", None) or "eager"
        sliding = getattr(config, "sliding_window", None) is not None
        if sliding and impl not in ("sdpa", "eager"):
            raise TyrError(
                f"compact mode with sliding-window attention needs attn_implementation 'sdpa' or 'eager', not {impl!r}"
            )

    # ----- public -----------------------------------------------------------------------------------------------

    def apply(self, variants: Sequence[Variant | None]) -> int:
        """Apply one variant per gene (``genes_of`` order; None = dense). Returns the number of genes swapped."""
        if len(variants) != len(self.genes):
            raise TyrError(
                f"genome has {len(variants)} genes but the model has {len(self.genes)} "
                f"({self.adapter.num_layers} layers x attn, mlp)"
            )
        changed = [
            g
            for g, variant in enumerate(variants)
            if (variant.key if variant is not None else None) != self.keys[g]
        ]
        for g in changed:  # validate everything first so a bad genome leaves the model untouched
            if variants[g] is not None:
                self._validate(variants[g], self.genes[g])
        for g in changed:
            variant = variants[g]
            self._swap(g, self.genes[g], variant)
            self.keys[g] = variant.key if variant is not None else None
        self.swaps += len(changed)
        return len(changed)

    def restore_dense(self) -> None:
        """Put the original dense model back exactly."""
        self.apply([None] * len(self.genes))
        self._dense_out.clear()
        self._dense_bias.clear()

    # ----- internals --------------------------------------------------------------------------------------------

    def _validate(self, variant: Variant, gene: Gene) -> None:
        if variant.gene != gene:
            raise TyrError(
                f"genome out of order: variant for gene {variant.gene.name} at the position of {gene.name}"
            )
        n_units = self.adapter.num_units(gene.kind)
        kept = variant.kept
        if kept.dim() != 1 or kept.dtype.is_floating_point or kept.dtype == torch.bool:
            raise TyrError(f"gene {gene.name}: kept must be a 1-D integer tensor")
        if kept.numel():
            k = kept.detach().cpu()
            if (
                int(k.min()) < 0
                or int(k.max()) >= n_units
                or (k.numel() > 1 and bool((k[1:] <= k[:-1]).any()))
            ):
                raise TyrError(f"gene {gene.name}: kept must be sorted unique unit indices in [0, {n_units})")
        if variant.bias is not None and tuple(variant.bias.shape) != (self.adapter.hidden_size,):
            raise TyrError(
                f"gene {gene.name}: variant bias has shape {tuple(variant.bias.shape)}, "
                f"expected ({self.adapter.hidden_size},)"
            )
        want = (self.adapter.hidden_size, kept.numel() * self.adapter.group_size(gene.kind))
        if tuple(variant.weight.shape) != want:
            raise TyrError(
                f"gene {gene.name}: variant weight has shape {tuple(variant.weight.shape)}, expected {want}; "
                "was the supernet built for another model?"
            )

    @torch.no_grad()
    def _swap(self, g: int, gene: Gene, variant: Variant | None) -> None:
        if self.mode == "masked":
            self._swap_masked(g, gene, variant)
        elif gene.kind == "attn":
            self._swap_compact_attn(gene.layer, variant)
        else:
            self._swap_compact_mlp(gene.layer, variant)

    def _swap_masked(self, g: int, gene: Gene, variant: Variant | None) -> None:
        lin = self.adapter.output_proj(gene.layer, gene.kind)
        if g not in self._dense_out:
            if variant is None:
                return  # already dense
            self._dense_out[g] = lin.weight.detach().clone()
            self._dense_bias[g] = lin.bias
        dense_bias = self._dense_bias[g]
        if variant is None:
            lin.weight.copy_(self._dense_out[g])
            lin.bias = dense_bias
            return
        cols = self.adapter.units(gene.kind).columns(variant.kept, lin.weight.device)
        lin.weight.zero_()
        lin.weight.index_copy_(1, cols, _fitted(variant, lin))
        if variant.bias is None:
            lin.bias = dense_bias
        else:
            lin.bias = nn.Parameter(_output_bias(dense_bias, variant, lin), requires_grad=False)

    def _swap_compact_attn(self, i: int, variant: Variant | None) -> None:
        layer, dense = self.adapter.layer(i), self._dense_attn[i]
        if variant is None:
            layer.self_attn = dense
            return
        o = dense.o_proj
        layer.self_attn = CompactAttention.from_dense(
            dense, self.adapter, variant.kept, _fitted(variant, o), _output_bias(o.bias, variant, o)
        )

    def _swap_compact_mlp(self, i: int, variant: Variant | None) -> None:
        mlp = self.adapter.layer(i).mlp
        gate, up, down = self._dense_mlp[i]
        if variant is None:
            mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, up, down
            return
        rows = self.adapter.units("mlp").columns(variant.kept, gate.weight.device)
        mlp.gate_proj = _rows(gate, rows)
        mlp.up_proj = _rows(up, rows)
        bias = _output_bias(down.bias, variant, down)
        mlp.down_proj = _linear(_fitted(variant, down), bias, down.weight.requires_grad)
