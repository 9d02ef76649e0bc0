"""Model-family adapter: where the prunable modules of a decoder-only LLM live and how many parameters they hold.

All supported families share one layout::

    model.model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
                           mlp.{gate,up,down}_proj}

and differ only in the details listed in :data:`FAMILIES` (biases, per-head q/k norms, the modeling module that
holds ``apply_rotary_pos_emb``). Differences are data in that one table, never forked classes.

The prunable units are query heads for attention (group size ``head_dim``) and intermediate channels for the
MLP (group size 1). A KV head is removed only when none of its query heads is kept.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from tyr.errors import TyrError
from tyr.supernet.units import UnitLayout
from tyr.supernet.variant import GeneKind

# A flag is a constant or the name of a boolean config attribute (missing attribute = False).
Flag = bool | str


@dataclass(frozen=True)
class FamilySpec:
    """How one family departs from the shared layout."""

    modeling: str  # module holding apply_rotary_pos_emb
    qkv_bias: Flag
    o_bias: Flag
    mlp_bias: Flag
    qk_norm: bool  # self_attn.q_norm / k_norm: RMSNorm over head_dim, applied per head before RoPE


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec(
        "transformers.models.llama.modeling_llama", "attention_bias", "attention_bias", "mlp_bias", False
    ),
    "mistral": FamilySpec("transformers.models.mistral.modeling_mistral", False, False, False, False),
    "qwen2": FamilySpec("transformers.models.qwen2.modeling_qwen2", True, False, False, False),
    "qwen3": FamilySpec(
        "transformers.models.qwen3.modeling_qwen3", "attention_bias", "attention_bias", False, True
    ),
}

SUPPORTED = ", ".join(sorted(FAMILIES))


def _flag(config, flag: Flag) -> bool:
    return bool(getattr(config, flag, False)) if isinstance(flag, str) else flag


def _has_bias(linear: nn.Linear) -> bool:
    return linear.bias is not None


class ModelAdapter:
    """Family-agnostic view of a loaded HF causal LM (``*ForCausalLM``) of a supported family.

    Attributes: model_type, spec, num_layers, hidden_size, num_heads, num_kv_heads, head_dim,
    intermediate_size, qkv_bias, o_bias, mlp_bias, qk_norm.
    """

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in FAMILIES:
            raise TyrError(
                f"unsupported model architecture {model_type!r}: Tyr supports the decoder-only families {SUPPORTED}"
            )
        spec = FAMILIES[model_type]
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None or len(layers) == 0:
            raise TyrError(
                f"{model_type} model has no decoder layers at model.model.layers; load it as a causal LM"
            )
        self.model = model
        self.model_type: str = model_type
        self.spec = spec
        self._layers = layers
        self.num_layers: int = len(layers)

        try:
            attn, mlp = layers[0].self_attn, layers[0].mlp
            self.hidden_size: int = attn.q_proj.in_features
            self.head_dim: int = int(attn.head_dim)
            self.num_heads: int = attn.q_proj.out_features // self.head_dim
            self.num_kv_heads: int = attn.k_proj.out_features // self.head_dim
            self.intermediate_size: int = mlp.gate_proj.out_features
        except AttributeError as err:
            raise TyrError(
                f"{model_type} model does not have the expected decoder-layer layout: {err}"
            ) from err
        if self.num_kv_heads == 0 or self.num_heads % self.num_kv_heads:
            raise TyrError(
                f"{self.num_heads} query heads do not split evenly into {self.num_kv_heads} KV heads"
            )
        self.group: int = self.num_heads // self.num_kv_heads
        self._attention_units = UnitLayout.attention(self.num_heads, self.num_kv_heads, self.head_dim)
        self._mlp_units = UnitLayout.mlp(self.intermediate_size)

        self.qkv_bias = _flag(config, spec.qkv_bias)
        self.o_bias = _flag(config, spec.o_bias)
        self.mlp_bias = _flag(config, spec.mlp_bias)
        self.qk_norm = spec.qk_norm
        self._check_layers()

    def _check_layers(self) -> None:
        """Every layer must have the dense shapes and biases the table predicts (a pruned checkpoint does not)."""
        h, hd = self.hidden_size, self.head_dim
        want = {
            "q_proj": (self.num_heads * hd, h, self.qkv_bias),
            "k_proj": (self.num_kv_heads * hd, h, self.qkv_bias),
            "v_proj": (self.num_kv_heads * hd, h, self.qkv_bias),
            "o_proj": (h, self.num_heads * hd, self.o_bias),
            "gate_proj": (self.intermediate_size, h, self.mlp_bias),
            "up_proj": (self.intermediate_size, h, self.mlp_bias),
            "down_proj": (h, self.intermediate_size, self.mlp_bias),
        }
        for i, layer in enumerate(self._layers):
            for name, (out_f, in_f, bias) in want.items():
                parent = (
                    layer.mlp if name.endswith(("gate_proj", "up_proj", "down_proj")) else layer.self_attn
                )
                lin = getattr(parent, name, None)
                if not isinstance(lin, nn.Linear):
                    raise TyrError(
                        f"layer {i}: {name} is not a dense nn.Linear (is the model already pruned?)"
                    )
                if (lin.out_features, lin.in_features, _has_bias(lin)) != (out_f, in_f, bias):
                    raise TyrError(
                        f"layer {i}: {name} has shape {(lin.out_features, lin.in_features)} bias={_has_bias(lin)}, "
                        f"expected {(out_f, in_f)} bias={bias} for a dense {self.model_type} model"
                    )
            if self.qk_norm and not all(hasattr(layer.self_attn, n) for n in ("q_norm", "k_norm")):
                raise TyrError(f"layer {i}: {self.model_type} attention lacks q_norm/k_norm")

    # ----- structure -----------------------------------------------------------------------------------------

    def layer(self, i: int) -> nn.Module:
        return self._layers[i]

    def num_units(self, kind: GeneKind) -> int:
        return self.units(kind).num_units

    def group_size(self, kind: GeneKind) -> int:
        return self.units(kind).group_size

    def output_proj(self, i: int, kind: GeneKind) -> nn.Linear:
        layer = self._layers[i]
        return layer.self_attn.o_proj if _kind(kind) == "attn" else layer.mlp.down_proj

    def units(self, kind: GeneKind) -> UnitLayout:
        """The pruning unit of `kind` and the projection slices it couples (`tyr.supernet.units`)."""
        return self._attention_units if _kind(kind) == "attn" else self._mlp_units

    def kv_head_of(self, q_head: int) -> int:
        return self._attention_units.kv_head_of(q_head)

    def kept_kv_heads(self, kept_heads: Iterable[int]) -> list[int]:
        return self._attention_units.kept_kv_heads(kept_heads)

    def rotary_fn(self) -> Callable:
        """The family's ``apply_rotary_pos_emb(q, k, cos, sin)``."""
        return importlib.import_module(self.spec.modeling).apply_rotary_pos_emb

    # ----- parameter counts (equal to sum(p.numel()) of the compact projections) ---------------------------------

    def attention_params(self, kept_heads: Iterable[int]) -> int:
        """q, k, v, o weights and biases left when only ``kept_heads`` query heads remain.

        K/V rows go only with a KV head none of whose query heads is kept; the o_proj bias always stays.
        Per-head q_norm/k_norm (qwen3) are not prunable and not counted.
        """
        return self._attention_units.params(kept_heads, self.hidden_size, self.qkv_bias, self.o_bias)

    def mlp_params(self, num_kept_channels: int) -> int:
        """gate, up, down weights and biases with ``num_kept_channels`` intermediate channels left."""
        return self._mlp_units.params(
            range(int(num_kept_channels)), self.hidden_size, self.mlp_bias, self.mlp_bias
        )

    def module_params(self, kind: GeneKind, kept: Iterable[int]) -> int:
        kept = _as_list(kept)
        return self.attention_params(kept) if _kind(kind) == "attn" else self.mlp_params(len(kept))

    def dense_module_params(self, kind: GeneKind) -> int:
        return self.module_params(kind, range(self.num_units(kind)))

    def dense_prunable_params(self) -> int:
        """All q/k/v/o/gate/up/down parameters of the dense model (every layer)."""
        return self.num_layers * (self.dense_module_params("attn") + self.dense_module_params("mlp"))


def _kind(kind: str) -> str:
    if kind not in ("attn", "mlp"):
        raise ValueError(f"unknown gene kind {kind!r}; expected 'attn' or 'mlp'")
    return kind


def _as_list(kept: Iterable[int]) -> list[int]:
    if hasattr(kept, "tolist"):
        return [int(k) for k in kept.tolist()]
    return [int(k) for k in kept]


def adapter_for(model: nn.Module) -> ModelAdapter:
    return ModelAdapter(model)


def find_rotary(model: nn.Module) -> nn.Module:
    """The module computing ``(cos, sin)`` position embeddings: ``model.model.rotary_emb``."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        raise TyrError("model has no rotary embedding at model.model.rotary_emb; is it a supported family?")
    return rotary
