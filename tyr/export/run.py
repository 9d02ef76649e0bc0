"""Exporting a finished ``tyr run``: find its final genome and supernet (through ``RunDir``), rebuild the dense
model as the run used it, and hand both to ``export_model``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tyr.errors import TyrError
from tyr.export.folder import check_output_folder
from tyr.export.writer import check_format, export_model

if TYPE_CHECKING:
    import torch


@dataclass
class RunFinal:
    """What a finished run's final model is made of."""

    run: Path
    config: object  # RunConfig
    architecture: dict
    metrics: dict | None
    iteration: int
    genome: tuple[int, ...]
    supernet: Path
    dtype: str | None


def read_run(run: str | os.PathLike) -> RunFinal:
    """Check that ``run`` is a finished Tyr run and find its final genome and the supernet it comes from."""
    from tyr.rundir import RunDir

    rd = RunDir(run)
    if not rd.path.exists():
        raise TyrError(f"run directory {rd.path} does not exist")
    cfg = rd.load_config()
    if not rd.architecture_path.is_file():
        raise TyrError(
            f"the run in {rd.path} has not finished (no {rd.relative(rd.architecture_path)}); re-run the same "
            "`tyr run` command to finish it"
        )
    architecture = _read_json(rd.architecture_path)
    metrics = _read_json(rd.metrics_path) if rd.metrics_path.is_file() else None
    selection = rd.selection()
    supernet = rd.supernet_dir(selection.iteration)
    manifest = rd.read_manifest(selection.iteration)
    if manifest is None:
        raise TyrError(
            f"{rd.relative(supernet)} (the supernet of the final genome) is missing or unreadable; "
            "the run directory is incomplete"
        )
    dtype = (manifest.get("fingerprint") or {}).get("dtype")
    return RunFinal(
        rd.path, cfg, architecture, metrics, selection.iteration, selection.genome, supernet, dtype
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TyrError(f"{path} is unreadable ({e}); re-run `tyr run` to rewrite it") from None
    if not isinstance(data, dict):
        raise TyrError(f"{path} does not hold a JSON object")
    return data


def load_run_model(final: RunFinal, device: str | None = "cpu"):
    """(dense model as the run used it, tokenizer, resolved model, adapter, variants of the final genome)."""
    from tyr import pipeline
    from tyr.models import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model
    from tyr.rundir import RunDir
    from tyr.supernet.families import adapter_for
    from tyr.supernet.store import SupernetStore
    from tyr.supernet.variant import genes_of

    cfg = final.config
    dev = resolve_device(device or cfg.model.device)
    dtype = _torch_dtype(final.dtype) or resolve_dtype(cfg.model.dtype, dev)
    resolved = resolve_model(cfg.model.name)
    # the variants were fitted to the base weights the run began with: refuse weights changed in place since
    RunDir(final.run).check_inputs(
        {"model_weights_sha256": pipeline.base_weights_sha256(resolved)}, record=False
    )
    model = load_model(resolved, dtype, dev)
    if cfg.model.num_layers is not None:
        pipeline._truncate_layers(model, cfg.model.num_layers)
    adapter = adapter_for(model)
    tokenizer = load_tokenizer(resolved)
    store = SupernetStore.open(final.supernet)
    genes = genes_of(adapter.num_layers)
    if len(final.genome) != len(genes):
        raise TyrError(
            f"the final genome has {len(final.genome)} genes but the model has {len(genes)}; "
            "the run directory does not match its model"
        )
    variants = [store.variant(g, lv) for g, lv in zip(genes, final.genome)]
    return model, tokenizer, resolved, adapter, variants


def _torch_dtype(name: str | None) -> torch.dtype | None:
    import torch

    if not name:
        return None
    value = getattr(torch, str(name).removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None


def export_run(
    run: str | os.PathLike, out: str | os.PathLike, format: str = "hf", force: bool = False
) -> Path:
    """Export a finished run's final model (the last iteration's genome on its supernet)."""
    check_format(format)
    final = read_run(run)
    check_output_folder(Path(out), force, protect=[final.run])
    model, tokenizer, resolved, adapter, variants = load_run_model(final)
    protect = [final.run]
    if Path(resolved.path).exists():
        protect.append(resolved.path)
    return export_model(
        model,
        variants,
        out,
        tokenizer=tokenizer,
        adapter=adapter,
        format=format,
        force=force,
        architecture=final.architecture,
        metrics=final.metrics,
        base_model_path=resolved.path,
        protect=protect,
    )
