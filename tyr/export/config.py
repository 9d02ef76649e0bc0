"""``config.json`` of an exported model: the family's stock config when it describes the pruned shapes, otherwise a
``tyr_<family>`` config with per-layer lists and an ``auto_map`` into the modeling file saved alongside."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tyr.errors import TyrError
from tyr.export.architecture import LayerShape, has_added_biases, is_uniform

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tyr.supernet.families import ModelAdapter

MODELING_FILE = "modeling_tyr.py"
# Keys of the dense config that describe where it came from, not the exported model.
_NOT_COPIED = ("_name_or_path", "auto_map", "_commit_hash")


def base_config(model: nn.Module, dtype: torch.dtype) -> dict:
    """The dense model's config as a dict (``transformers_version`` kept), with the export's ``dtype``."""
    config = model.config.to_dict()
    for key in _NOT_COPIED:
        config.pop(key, None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    return config


def dense_masked_config(model: nn.Module, dtype: torch.dtype) -> dict:
    """config.json of the dense-masked format: the original architecture."""
    config = base_config(model, dtype)
    config["architectures"] = [type(model).__name__]
    return config


def pruned_config(
    model: nn.Module, adapter: ModelAdapter, shapes: Sequence[LayerShape], dtype: torch.dtype
) -> tuple[dict, bool]:
    """(config.json dict, uses remote code) of the compact model."""
    from tyr import modeling_tyr

    config = base_config(model, dtype)
    config["head_dim"] = adapter.head_dim
    config["tie_word_embeddings"] = bool(getattr(model.config, "tie_word_embeddings", False))
    family = adapter.model_type
    if is_uniform(shapes):
        s = shapes[0]
        stock = dict(config)
        stock["num_attention_heads"] = len(s.kept_heads)
        stock["num_key_value_heads"] = len(s.kept_kv_heads)
        stock["intermediate_size"] = len(s.kept_channels)
        stock["architectures"] = [type(model).__name__]
        if _stock_config_accepts(family, stock):
            return stock, False
    if family not in modeling_tyr.CLASSES:
        raise TyrError(f"no pruned modeling code for model type {family!r}")
    config_cls, model_cls = modeling_tyr.CLASSES[family]
    module = Path(MODELING_FILE).stem
    config["model_type"] = config_cls.model_type
    config["architectures"] = [model_cls.__name__]
    config["auto_map"] = {
        "AutoConfig": f"{module}.{config_cls.__name__}",
        "AutoModelForCausalLM": f"{module}.{model_cls.__name__}",
    }
    config["num_attention_heads_per_layer"] = [len(s.kept_heads) for s in shapes]
    config["num_key_value_heads_per_layer"] = [len(s.kept_kv_heads) for s in shapes]
    config["kv_head_index_per_layer"] = [list(s.kv_index) for s in shapes]
    config["intermediate_size_per_layer"] = [len(s.kept_channels) for s in shapes]
    if has_added_biases(shapes):
        config["o_proj_bias_per_layer"] = [s.o_bias for s in shapes]
        config["down_proj_bias_per_layer"] = [s.down_bias for s in shapes]
    return config, True


def _stock_config_accepts(family: str, config: dict) -> bool:
    """Whether the family's stock config class takes the reduced counts (Llama wants hidden % heads == 0)."""
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(family).__class__.from_dict(dict(config))
    except Exception:  # huggingface_hub's strict validation error is not a ValueError
        return False
    return True
