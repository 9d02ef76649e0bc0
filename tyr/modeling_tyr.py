"""Structurally pruned Llama / Mistral / Qwen2 / Qwen3 causal LMs with a different shape in every layer.

Written by `tyr export` next to the weights of a pruned model and loaded with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``; ``tyr.load_pruned(folder)`` loads the
same classes from the installed tyr package instead. Self-contained: imports only torch and transformers.

Each class subclasses the installed transformers class of its family and differs in three ways only:

* every decoder layer's ``self_attn`` and ``mlp`` are sized by per-layer lists in the config:
  ``num_attention_heads_per_layer`` (kept query heads), ``num_key_value_heads_per_layer`` (kept KV heads),
  ``kv_head_index_per_layer`` (for each kept query head, the position of its KV head among the kept KV heads,
  so any number of query heads per KV group works) and ``intermediate_size_per_layer``. Tensor names are
  unchanged (``model.layers.N.self_attn.q_proj.weight``, ...); only their shapes differ.
* a layer with 0 query heads (or 0 MLP channels) is a no-op: it adds only its output bias, if any, to the
  residual stream, and its attention uses no KV cache.
* ``forward`` marks the attention-free layers of a ``DynamicCache`` as cache-less (``DummyLayer``), so that the
  sequence length the model reads off the cache comes from a layer that does store keys and values.

Each family's attention (``TyrLlamaAttention``, ...) is also an instance of the family's own attention class, so
that transformers' output recorders collect its weights: ``output_attentions=True`` (with
``attn_implementation="eager"``) returns one ``(batch, kept heads, queries, keys)`` tensor per layer, empty in the
head dimension for a fully pruned layer.

The global ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` keep the values of the dense
model the checkpoint was pruned from; ``head_dim`` is always explicit. A static cache is not supported (its
layers are pre-sized from the global head counts); use the default dynamic cache.
"""

from __future__ import annotations

import importlib
import warnings

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.activations import ACT2FN
from transformers.cache_utils import DummyLayer, DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

PER_LAYER_KEYS = (
    "num_attention_heads_per_layer",
    "num_key_value_heads_per_layer",
    "kv_head_index_per_layer",
    "intermediate_size_per_layer",
)

# Which projections carry a bias, per family: a constant or the name of a boolean config attribute.
_BIASES = {
    "llama": {"qkv": "attention_bias", "o": "attention_bias", "mlp": "mlp_bias", "qk_norm": False},
    "mistral": {"qkv": False, "o": False, "mlp": False, "qk_norm": False},
    "qwen2": {"qkv": True, "o": False, "mlp": False, "qk_norm": False},
    "qwen3": {"qkv": "attention_bias", "o": "attention_bias", "mlp": False, "qk_norm": True},
}


def _flag(config, flag) -> bool:
    return bool(getattr(config, flag, False)) if isinstance(flag, str) else bool(flag)


def _layer_flag(config, key: str, layer_idx: int) -> bool:
    """Per-layer switch of the pruned config (e.g. a compensation bias added by FLAP); absent means False."""
    values = getattr(config, key, None)
    return bool(values[layer_idx]) if values else False


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """``nn.Linear`` that may have zero features (a fully pruned layer) without torch's init warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(in_features, out_features, bias=bias)


def _family_module(family: str):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def check_per_layer_config(config) -> None:
    """Raise ValueError unless the per-layer lists describe ``config.num_hidden_layers`` consistent layers."""
    n = config.num_hidden_layers
    for key in PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise ValueError(f"{type(config).__name__}.{key} must be a list with one entry per layer ({n})")
    for i in range(n):
        heads = config.num_attention_heads_per_layer[i]
        kv_heads = config.num_key_value_heads_per_layer[i]
        index = list(config.kv_head_index_per_layer[i])
        if (
            len(index) != heads
            or any(not 0 <= j < kv_heads for j in index)
            or set(index) != set(range(kv_heads))
        ):
            raise ValueError(
                f"layer {i}: kv_head_index_per_layer must give each of the {heads} query heads one of the "
                f"{kv_heads} KV heads, and use every KV head; got {index}"
            )
        if config.intermediate_size_per_layer[i] < 0:
            raise ValueError(f"layer {i}: negative intermediate size")


class TyrAttention(nn.Module):
    """Self-attention with this layer's kept query heads and KV heads.

    Query head ``j`` attends with KV head ``kv_index[j]``. When every KV head serves the same number of
    consecutive query heads the usual grouped-query path is taken; otherwise each query head's KV head is
    gathered after the cache update (the cache stores only the kept KV heads).
    """

    def __init__(self, config, layer_idx: int, family: str):
        # Not super().__init__(): in the per-family subclasses that is the family attention's, sized globally.
        nn.Module.__init__(self)
        flags = _BIASES[family]
        module = _family_module(family)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = int(config.head_dim)
        self.hidden_size = int(config.hidden_size)
        self.num_heads = int(config.num_attention_heads_per_layer[layer_idx])
        self.num_key_value_heads = int(config.num_key_value_heads_per_layer[layer_idx])
        self.kv_index = [int(j) for j in config.kv_head_index_per_layer[layer_idx]]
        groups = self.num_heads // self.num_key_value_heads if self.num_key_value_heads else 0
        self._gather = bool(groups) and self.kv_index != [j // groups for j in range(self.num_heads)]
        self.num_key_value_groups = 1 if self._gather or not groups else groups
        self._kv_index_tensor: torch.Tensor | None = None
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            sliding = layer_types[layer_idx] == "sliding_attention"
            self.sliding_window = config.sliding_window if sliding else None
        else:
            self.sliding_window = getattr(config, "sliding_window", None)
        self._rotary = module.apply_rotary_pos_emb
        self._eager = module.eager_attention_forward

        qkv_bias = _flag(config, flags["qkv"])
        o_bias = _flag(config, flags["o"]) or _layer_flag(config, "o_proj_bias_per_layer", layer_idx)
        q_out, kv_out = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = _linear(self.hidden_size, q_out, qkv_bias)
        self.k_proj = _linear(self.hidden_size, kv_out, qkv_bias)
        self.v_proj = _linear(self.hidden_size, kv_out, qkv_bias)
        self.o_proj = _linear(q_out, self.hidden_size, o_bias)
        if flags["qk_norm"]:
            norm = module.Qwen3RMSNorm
            self.q_norm = norm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = norm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}"

    def _index(self, device: torch.device) -> torch.Tensor:
        if self._kv_index_tensor is None or self._kv_index_tensor.device != device:
            self._kv_index_tensor = torch.tensor(self.kv_index, dtype=torch.long, device=device)
        return self._kv_index_tensor

    def _no_heads_weights(self, hidden_states, attention_mask) -> torch.Tensor | None:
        """Attention weights of a layer without heads: (B, 0, T, S) where the implementation returns weights."""
        if self.config._attn_implementation != "eager":  # sdpa / flash / flex return None
            return None
        batch, length = hidden_states.shape[:2]
        keys = attention_mask.shape[-1] if isinstance(attention_mask, torch.Tensor) else length
        return hidden_states.new_zeros(batch, 0, length, keys)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        else:
            kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        if self.num_heads == 0:  # fully pruned: only o_proj's bias (if any) remains; no KV cache
            out = hidden_states.new_zeros(*input_shape, self.hidden_size)
            if self.o_proj.bias is not None:
                out = out + self.o_proj.bias
            return out, self._no_heads_weights(hidden_states, attention_mask)

        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self._rotary(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        if self._gather:  # each kept query head's KV head (uneven groups)
            index = self._index(key.device)
            key, value = key.index_select(1, index), value.index_select(1, index)

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        out, weights = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


# Per family: the same attention, seen by transformers' output recorders (``output_attentions``) as the family's.
class TyrLlamaAttention(TyrAttention, LlamaAttention):
    pass


class TyrMistralAttention(TyrAttention, MistralAttention):
    pass


class TyrQwen2Attention(TyrAttention, Qwen2Attention):
    pass


class TyrQwen3Attention(TyrAttention, Qwen3Attention):
    pass


class TyrMLP(nn.Module):
    """Gated MLP with this layer's kept intermediate channels (0 channels: only down_proj's bias remains)."""

    def __init__(self, config, layer_idx: int, family: str):
        super().__init__()
        bias = _flag(config, _BIASES[family]["mlp"])
        self.hidden_size = int(config.hidden_size)
        self.intermediate_size = int(config.intermediate_size_per_layer[layer_idx])
        self.gate_proj = _linear(self.hidden_size, self.intermediate_size, bias)
        self.up_proj = _linear(self.hidden_size, self.intermediate_size, bias)
        down_bias = bias or _layer_flag(config, "down_proj_bias_per_layer", layer_idx)
        self.down_proj = _linear(self.intermediate_size, self.hidden_size, down_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def extra_repr(self) -> str:
        return f"channels={self.intermediate_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.intermediate_size == 0:
            out = x.new_zeros(*x.shape[:-1], self.hidden_size)
            return out + self.down_proj.bias if self.down_proj.bias is not None else out
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _mark_attention_free_layers(cache, attention_free: list[int], num_layers: int) -> None:
    """Give each attention-free layer a cache-less ``DummyLayer`` slot (only while it holds nothing)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return
    replicate = getattr(cache, "layer_class_to_replicate", None)
    if not layers and replicate is not None:  # a lazily grown DynamicCache(): lay out every layer now
        layers.extend(DummyLayer() if i in attention_free else replicate() for i in range(num_layers))
        return
    for i in attention_free:
        fresh = i < len(layers) and not getattr(layers[i], "is_initialized", False)
        if fresh and not isinstance(layers[i], DummyLayer):
            layers[i] = DummyLayer()


class _TyrCausalLMMixin:
    """Builds the per-layer modules after the family's dense ``__init__`` (free under the meta device)."""

    _tyr_family = ""
    _tyr_attention = TyrAttention

    def __init__(self, config):
        check_per_layer_config(config)
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = self._tyr_attention(config, i, self._tyr_family)
            layer.mlp = TyrMLP(config, i, self._tyr_family)
        heads = config.num_attention_heads_per_layer
        self._tyr_attention_free = [i for i, n in enumerate(heads) if n == 0]
        if len(self._tyr_attention_free) == len(heads):  # no layer reads the cache: nothing to align
            self._tyr_attention_free = []
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        else:
            kwargs.pop("past_key_values", None)
        if self._tyr_attention_free:
            wants_cache = use_cache if use_cache is not None else self.config.use_cache
            if cache is None and wants_cache and not (self.training and self.is_gradient_checkpointing):
                cache = DynamicCache(config=self.config)
            if cache is not None:
                _mark_attention_free_layers(cache, self._tyr_attention_free, self.config.num_hidden_layers)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


class TyrLlamaConfig(LlamaConfig):
    model_type = "tyr_llama"
    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    kv_head_index_per_layer: list[list[int]] | None = None
    intermediate_size_per_layer: list[int] | None = None


class TyrMistralConfig(MistralConfig):
    model_type = "tyr_mistral"
    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    kv_head_index_per_layer: list[list[int]] | None = None
    intermediate_size_per_layer: list[int] | None = None


class TyrQwen2Config(Qwen2Config):
    model_type = "tyr_qwen2"
    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    kv_head_index_per_layer: list[list[int]] | None = None
    intermediate_size_per_layer: list[int] | None = None


class TyrQwen3Config(Qwen3Config):
    model_type = "tyr_qwen3"
    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    kv_head_index_per_layer: list[list[int]] | None = None
    intermediate_size_per_layer: list[int] | None = None


class TyrLlamaForCausalLM(_TyrCausalLMMixin, LlamaForCausalLM):
    config_class = TyrLlamaConfig
    _tyr_family = "llama"
    _tyr_attention = TyrLlamaAttention


class TyrMistralForCausalLM(_TyrCausalLMMixin, MistralForCausalLM):
    config_class = TyrMistralConfig
    _tyr_family = "mistral"
    _tyr_attention = TyrMistralAttention


class TyrQwen2ForCausalLM(_TyrCausalLMMixin, Qwen2ForCausalLM):
    config_class = TyrQwen2Config
    _tyr_family = "qwen2"
    _tyr_attention = TyrQwen2Attention


class TyrQwen3ForCausalLM(_TyrCausalLMMixin, Qwen3ForCausalLM):
    config_class = TyrQwen3Config
    _tyr_family = "qwen3"
    _tyr_attention = TyrQwen3Attention


# model_type of the dense family -> (config class, model class) of its pruned form
CLASSES = {
    "llama": (TyrLlamaConfig, TyrLlamaForCausalLM),
    "mistral": (TyrMistralConfig, TyrMistralForCausalLM),
    "qwen2": (TyrQwen2Config, TyrQwen2ForCausalLM),
    "qwen3": (TyrQwen3Config, TyrQwen3ForCausalLM),
}
