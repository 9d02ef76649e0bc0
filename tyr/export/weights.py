"""The exported weights: the model's state dict with the genome realised, written as (sharded) safetensors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tyr.export.architecture import LayerShape

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tyr.supernet.families import ModelAdapter

DEFAULT_SHARD_BYTES = 2 << 30
EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def realised_state(
    model: nn.Module, adapter: ModelAdapter, shapes: Sequence[LayerShape], fmt: str
) -> dict[str, torch.Tensor]:
    """The state dict of the model with the genome realised (compact for hf, zero-masked for dense-masked).

    Must be called between ``Realiser.apply`` and ``restore_dense`` and written before the latter; tensors are
    the model's own (detached), except for the rows zeroed here, which are copies. A tied ``lm_head`` is left
    out: the embedding holds it once.
    """
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if fmt == "dense-masked":
        for i, s in enumerate(shapes):
            _zero_dropped_rows(state, adapter, f"model.layers.{i}.", s)
    tied = getattr(model.config, "tie_word_embeddings", False)
    head, embed = state.get(LM_HEAD), state.get(EMBEDDING)
    if tied and head is not None and embed is not None and head.data_ptr() == embed.data_ptr():
        del state[LM_HEAD]
    return state


def _zero_dropped_rows(state: dict, adapter: ModelAdapter, prefix: str, shape: LayerShape) -> None:
    dropped = {
        **{f"self_attn.{n}": r for n, r in adapter.units("attn").dropped_rows(shape.kept_heads).items()},
        **{f"mlp.{n}": r for n, r in adapter.units("mlp").dropped_rows(shape.kept_channels).items()},
    }
    for name, rows in dropped.items():
        if rows.numel() == 0:
            continue
        for suffix in ("weight", "bias"):
            key = f"{prefix}{name}.{suffix}"
            if key in state:
                state[key] = state[key].clone()
                state[key][rows] = 0


def write_weights(
    directory: Path, state: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> None:
    """``model.safetensors``, or numbered shards of at most ``max_shard_bytes`` (a larger tensor gets a shard of
    its own) plus ``model.safetensors.index.json``, written by huggingface_hub; tensor names in sorted order.

    ``directory`` is the export's private temp folder: files are written in place (fsynced by the folder's
    final rename step, not here).
    """
    from huggingface_hub import save_torch_state_dict

    ordered = {name: _own_storage(state[name]) for name in sorted(state)}
    # Tied tensors must already be de-duplicated (realised_state); the discard list only names the copy to drop
    # should a shared lm_head slip through, instead of huggingface_hub's alphabetical choice.
    save_torch_state_dict(
        ordered, directory, max_shard_size=int(max_shard_bytes), shared_tensors_to_discard=[LM_HEAD]
    )


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a compact copy when it views a larger storage (huggingface_hub sizes shards by storage)."""
    if t.numel() and t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.contiguous().clone()
    return t
