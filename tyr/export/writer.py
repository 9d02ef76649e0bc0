"""``export_model``: write a dense model with a genome realised as a Hugging Face folder (the orchestrator)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tyr.errors import TyrError
from tyr.export import weights
from tyr.export.architecture import (
    ARCHITECTURE_FILE,
    LayerShape,
    check_architecture,
    compute_architecture,
    has_added_biases,
    layer_shapes,
    model_name_or_path,
)
from tyr.export.card import base_license, model_card
from tyr.export.config import MODELING_FILE, dense_masked_config, pruned_config
from tyr.export.folder import check_output_folder, staged_folder

if TYPE_CHECKING:
    from torch import nn

    from tyr.supernet.families import ModelAdapter
    from tyr.supernet.variant import Variant

FORMATS: tuple[str, ...] = ("hf", "dense-masked")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise TyrError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def export_model(
    model: nn.Module,
    variants: Sequence[Variant | None],
    out: str | os.PathLike,
    *,
    tokenizer=None,
    adapter: ModelAdapter | None = None,
    format: str = "hf",
    force: bool = False,
    architecture: dict | None = None,
    metrics: dict | None = None,
    base_model: str | None = None,
    base_model_path: str | os.PathLike | None = None,
    target_sparsity: float | None = None,
    generation_config=None,
    protect: Iterable[str | os.PathLike] = (),
    max_shard_bytes: int = weights.DEFAULT_SHARD_BYTES,
) -> Path:
    """Export the dense ``model`` with the genome ``variants`` (one per gene, ``genes_of`` order; None = dense).

    The model must be dense (unrealised); it is realised for the export and restored exactly afterwards.
    ``architecture`` (default: computed) is written as ``architecture.json``; ``metrics`` (a run's
    ``final/metrics.json``) goes into the model card, and so does the license of the base model's own card,
    looked up (never downloaded) in ``base_model_path`` (a local folder or hub id; default: the architecture's
    ``base_model``, then the model's ``name_or_path``). ``protect`` lists folders that ``force`` must never
    delete (the run, the base model). Returns the output folder.
    """
    from tyr.io import atomic_write_json, atomic_write_text
    from tyr.supernet.families import ModelAdapter

    check_format(format)
    adapter = ModelAdapter(model) if adapter is None else adapter
    adapter._check_layers()  # refuses an already pruned (compact) model
    out = Path(out)
    check_output_folder(out, force, protect)
    shapes = layer_shapes(adapter, variants)
    if architecture is None:
        architecture = compute_architecture(model, adapter, shapes, base_model, target_sparsity)
    else:
        check_architecture(architecture, shapes)
    config, remote = _config(model, adapter, shapes, format)
    license = base_license([base_model_path, architecture.get("base_model"), model_name_or_path(model)])
    with staged_folder(out) as tmp:
        _write_weights(tmp, model, adapter, variants, shapes, format, max_shard_bytes)
        _write_metadata(tmp, model, config, remote, generation_config, tokenizer)
        atomic_write_json(tmp / ARCHITECTURE_FILE, architecture)
        atomic_write_text(
            tmp / "README.md", model_card(architecture, metrics, format, remote, config, license)
        )
    return out


def _config(
    model: nn.Module, adapter: ModelAdapter, shapes: Sequence[LayerShape], fmt: str
) -> tuple[dict, bool]:
    """(config.json, needs the modeling file) of the format."""
    dtype = next(model.parameters()).dtype
    if fmt == "hf":
        return pruned_config(model, adapter, shapes, dtype)
    if has_added_biases(shapes):
        raise TyrError(
            "this genome adds compensation biases (FLAP criterion) that the original architecture cannot hold; "
            "export it with --format hf"
        )
    return dense_masked_config(model, dtype), False


def _write_weights(
    directory: Path,
    model: nn.Module,
    adapter: ModelAdapter,
    variants: Sequence[Variant | None],
    shapes: Sequence[LayerShape],
    fmt: str,
    max_shard_bytes: int,
) -> None:
    """Realise the genome (compact for hf, masked for dense-masked), write its weights, restore the dense model."""
    from tyr.supernet.realise import Realiser

    realiser = Realiser(model, adapter, mode="compact" if fmt == "hf" else "masked")
    try:
        realiser.apply(variants)
        weights.write_weights(directory, weights.realised_state(model, adapter, shapes, fmt), max_shard_bytes)
    finally:
        realiser.restore_dense()


def _write_metadata(
    directory: Path, model: nn.Module, config: dict, remote: bool, generation_config, tokenizer
):
    """config.json (+ the modeling file it names), generation_config.json and the tokenizer."""
    from transformers import GenerationConfig

    from tyr.io import atomic_write_json, atomic_write_text

    atomic_write_json(directory / "config.json", config)
    if remote:
        from tyr import modeling_tyr

        shutil.copyfile(modeling_tyr.__file__, directory / MODELING_FILE)
    gen = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if gen is None:
        gen = GenerationConfig.from_model_config(model.config)
    atomic_write_text(directory / "generation_config.json", gen.to_json_string(use_diff=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
