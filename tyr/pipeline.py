"""Orchestration of `tyr build` / `tyr run`: load what a stage needs, run it, write the run directory.

Reads as a list of named steps; the algorithms live in `supernet/`, `search/` and `evaluators/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tyr.config import RunConfig, dump_yaml, identity_dict
from tyr.data import TextSource, calibration_split, evaluation_tokens, load_tokens, save_tokens
from tyr.errors import TyrError
from tyr.io import atomic_write_json, sha256_json, sha256_tensor, sha256_text
from tyr.model_hash import folder_sha256, local_folder
from tyr.models import (
    ResolvedModel,
    cache_dir,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from tyr.rundir import RunDir, build_ledger_path, offload_dir
from tyr.supernet.builder import BuildPlan, BuildReport, Offload, build_supernet
from tyr.supernet.families import ModelAdapter, adapter_for
from tyr.supernet.ladder import Ladder, centre_for_sparsity, make_ladder, step_units
from tyr.supernet.pruner import PrunerOptions
from tyr.supernet.store import MANIFEST, SupernetStore
from tyr.supernet.variant import genes_of

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """A loaded model with its calibration tokens: what every stage of a run works on."""

    cfg: RunConfig
    resolved: ResolvedModel
    model: torch.nn.Module
    tokenizer: object
    adapter: ModelAdapter
    calibration: torch.Tensor  # (num_sequences, seq_len) int64
    device: torch.device
    # The run's identity as stored in RUN/config.yaml (fingerprints hash it, so that a setting added to Tyr
    # later does not change the fingerprints of existing runs); the current config's when there is no run.
    identity: dict = field(default_factory=dict)
    # Held-out tokens for the final metrics (data.eval), loaded up front by `open_run` so that a wrong
    # --eval-data fails before the search, not after it; None when not loaded.
    eval_tokens: torch.Tensor | None = None  # (num_eval_sequences, seq_len) int64
    # The validation windows (data.num_validation_sequences) when they were read with the calibration windows
    # (so a source too small for both fails before anything is written); None otherwise.
    validation: torch.Tensor | None = None  # (num_validation_sequences, seq_len) int64

    def __post_init__(self) -> None:
        if not self.identity:
            self.identity = identity_dict(self.cfg)


def open_run(
    cfg: RunConfig,
    run: RunDir,
    force: bool,
    progress: bool = True,
    with_eval: bool = True,
    driver: bool = False,
) -> tuple[RunDir, Session]:
    """Open the locked `run` (`RunDir.lock()`) for `cfg` (new, resumed, or replaced with `force`) and load
    what the run works on.

    Checks come first and nothing is written before the model and the data have loaded: a typo in a path
    never costs an existing run. A RUN holding a different config is refused unless `force`, and `force`
    replaces only a folder Tyr wrote. `driver`: this is `tyr run`'s driver (`backend.driver_device` applies).
    """
    identity = dump_yaml(cfg)
    model_path = Path(cfg.model.name).expanduser()
    protect = (model_path,) if model_path.exists() else ()
    action = run.check_open(identity, force, protect)
    saved = None
    if action == "resume":  # the windows this run first read, when it kept them (`keep_tokens`)
        saved = load_tokens(run.tokens_path("calibration"), (cfg.data.num_sequences, cfg.data.seq_len))
    session = open_session(
        cfg, progress=progress, calibration=saved, placement=driver_placement(cfg) if driver else None
    )
    if with_eval:
        session.eval_tokens = held_out_tokens(cfg, session.tokenizer)
    run.open(identity, action)
    run.check_inputs({"model_weights_sha256": base_weights_sha256(session.resolved)})
    session.identity = run.read_config()
    return run, session


def held_out_tokens(cfg: RunConfig, tokenizer) -> torch.Tensor:
    """The held-out evaluation windows of `data.eval` (every full window, or the first num_eval_sequences)."""
    source = TextSource(cfg.data.eval, cfg.data.eval_config, cfg.data.eval_split, cfg.data.text_field)
    return evaluation_tokens(source, tokenizer, cfg.data.seq_len, cfg.data.num_eval_sequences)


def base_weights_sha256(resolved: ResolvedModel) -> str | None:
    """Content hash of the base model's weights (cached per file; None, with a warning, when unknown)."""
    folder = local_folder(resolved.path)
    digest = folder_sha256(folder, cache_dir()) if folder is not None else None
    if digest is None:
        logger.warning("cannot hash the weights of %s: changes to them will not be detected", resolved.source)
    return digest


def keep_tokens(run: RunDir, name: str, tokens: torch.Tensor) -> None:
    """Save the run's `name` windows in `RUN/data/` once (`RunDir.tokens_path`); call it only after the teacher
    targets have confirmed (or been computed from) them, so that a damaged source is never kept."""
    path = run.tokens_path(name)
    if load_tokens(path, tuple(tokens.shape)) is None:
        save_tokens(path, tokens)


def driver_placement(cfg: RunConfig) -> tuple[torch.device, torch.dtype] | None:
    """`tyr run`'s driver on Ray with `backend.driver_device: cpu`: the model in host RAM, in the dtype GPU
    workers resolve (model.dtype; auto: bfloat16); None: model.device and model.dtype as usual."""
    if cfg.backend.driver_device != "cpu":
        return None
    if cfg.backend.kind != "ray":
        logger.warning(
            "backend.driver_device=cpu has no effect without Ray workers (backend.kind=serial runs everything "
            "in this process: use model.device=cpu for that)"
        )
        return None
    if cfg.search.fitness == "kl+hidden":
        logger.warning(
            "backend.driver_device=cpu: the kl+hidden fitness's teacher hidden states are computed on the driver's "
            "CPU (slow for large models)"
        )
    return torch.device("cpu"), resolve_dtype(cfg.model.dtype, torch.device("cuda"))


def open_session(
    cfg: RunConfig,
    progress: bool = True,
    calibration: torch.Tensor | None = None,
    placement: tuple[torch.device, torch.dtype] | None = None,
) -> Session:
    """Resolve and load model, tokenizer and calibration tokens (read from the data source, unless the
    `calibration` windows are given: a run's kept ones); check them against the config. `placement`: (device,
    dtype) instead of model.device and model.dtype (`driver_placement`)."""
    if not progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if placement is not None:
        device, dtype = placement
    else:
        device = resolve_device(cfg.model.device)
        dtype = resolve_dtype(cfg.model.dtype, device)
    resolved = resolve_model(cfg.model.name)
    # an overridden placement (a CPU driver) keeps the weights in host RAM: model.placement is the workers'
    model = load_model(
        resolved, dtype, device, placement=cfg.model.placement if placement is None else "single"
    )
    adapter = adapter_for(model)  # refuses unsupported families before any heavy work
    if cfg.model.num_layers is not None:
        _truncate_layers(model, cfg.model.num_layers)
        adapter = adapter_for(model)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len is not None and cfg.data.seq_len > max_len:
        raise TyrError(f"data.seq_len={cfg.data.seq_len} exceeds the model's maximum of {max_len} positions")
    cfg.validate_for_model({kind: adapter.num_units(kind) for kind in ("attn", "mlp")}, adapter.num_layers)
    tokenizer = load_tokenizer(resolved)
    if calibration is not None:
        return Session(cfg, resolved, model, tokenizer, adapter, calibration, device)
    source = TextSource(
        cfg.data.calibration, cfg.data.calibration_config, cfg.data.calibration_split, cfg.data.text_field
    )
    d = cfg.data
    tokens, validation = calibration_split(
        source,
        tokenizer,
        d.num_sequences,
        d.num_validation_sequences,
        d.seq_len,
        cfg.seed,
        d.max_source_tokens,
    )
    session = Session(cfg, resolved, model, tokenizer, adapter, tokens, device)
    session.validation = validation if d.num_validation_sequences else None
    return session


def _truncate_layers(model: torch.nn.Module, num_layers: int) -> None:
    layers = model.model.layers
    if not 1 <= num_layers <= len(layers):
        raise TyrError(f"model.num_layers must be in [1, {len(layers)}], got {num_layers}")
    model.model.layers = layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]


def iteration_steps(adapter: ModelAdapter, cfg: RunConfig, iteration: int) -> dict[str, int]:
    """Ladder step in units per module type: halved every iteration, clamped (ALGORITHM §3, §6)."""
    sn = cfg.supernet
    scale = 0.5 ** (iteration - 1)
    return {
        "attn": step_units(adapter.num_units("attn"), sn.attn_step * scale, sn.min_attn_step),
        "mlp": step_units(
            adapter.num_units("mlp"), sn.mlp_step * scale, sn.min_mlp_step, sn.channel_multiple
        ),
    }


def uniform_centres(adapter: ModelAdapter, cfg: RunConfig) -> list[int]:
    """Units removed per gene at the target sparsity (iteration 1's centres)."""
    multiple = {"attn": 1, "mlp": cfg.supernet.channel_multiple}
    return [
        centre_for_sparsity(adapter.num_units(g.kind), cfg.sparsity, multiple[g.kind])
        for g in genes_of(adapter.num_layers)
    ]


def plan_ladders(
    adapter: ModelAdapter, centres: list[int], steps: dict[str, int], num_levels: int
) -> list[Ladder]:
    return [
        make_ladder(g, adapter.num_units(g.kind), c, steps[g.kind], num_levels)
        for g, c in zip(genes_of(adapter.num_layers), centres, strict=True)
    ]


def build_plan(cfg: RunConfig, ladders: list[Ladder]) -> BuildPlan:
    sn = cfg.supernet
    storage = None if sn.storage_dtype == "auto" else resolve_dtype(sn.storage_dtype, torch.device("cpu"))
    solve = getattr(torch, sn.solve_dtype)
    return BuildPlan(
        ladders=ladders,
        accumulation=sn.accumulation,
        criterion=sn.criterion,
        attn_options=PrunerOptions(
            sn.damp, sn.use_hessian, sn.use_first_order, sn.attn_rounds, solve, sn.refit
        ),
        mlp_options=PrunerOptions(
            sn.damp, sn.use_hessian, sn.use_first_order, sn.mlp_rounds, solve, sn.refit
        ),
        batch_size=sn.batch_size,
        storage_dtype=storage,
        hessian_tf32=sn.hessian_tf32,
    )


def build_offload(cfg: RunConfig, directory: Path, device: torch.device) -> Offload:
    """Where the build of the supernet in `directory` keeps its hidden states (supernet.offload).

    `disk` writes into RUN/iter-N/supernet-offload/ (swept by the next command if a build is killed), or into
    a folder of its own inside supernet.offload_dir, named after the supernet so that a rerun replaces it.
    """
    sn = cfg.supernet
    if sn.offload_dir is not None and sn.offload != "disk":
        logger.warning("supernet.offload_dir has no effect unless supernet.offload=disk")
    if sn.hessian_tf32 and device.type != "cuda":
        logger.warning(f"supernet.hessian_tf32 has no effect on {device.type}: TF32 is a CUDA setting")
    if sn.offload == "auto":
        return Offload("none" if device.type == "cpu" else "host")
    if sn.offload != "disk":
        return Offload(sn.offload)
    if sn.offload_dir is None:
        return Offload("disk", offload_dir(directory))
    name = f"tyr-offload-{sha256_text(str(Path(directory).resolve()))[:16]}"
    return Offload("disk", Path(sn.offload_dir).expanduser() / name)


def supernet_fingerprint(session: Session, ladders: list[Ladder]) -> dict:
    """What a supernet depends on; a stored supernet with another fingerprint is never reused."""
    return {
        "model": session.resolved.identity,
        "model_config": sha256_json(session.model.config.to_dict()),
        "dtype": str(next(session.model.parameters()).dtype),
        "calibration": sha256_tensor(session.calibration),
        "supernet": session.identity["supernet"],
        "ladders": [
            [ld.gene.name, ld.num_units, ld.centre_removed, ld.step, list(ld.levels)] for ld in ladders
        ],
    }


def build_iteration_supernet(
    session: Session,
    directory: Path,
    centres: list[int],
    iteration: int,
    force: bool = False,
    progress: bool = True,
    workers: Any = None,
) -> tuple[SupernetStore, BuildReport]:
    """Build (or resume) one iteration's supernet around per-gene `centres` (units removed); on the run's Ray
    workers (`tyr.cluster.RayEvaluatorFactory`) when given, else in this process."""
    steps = iteration_steps(session.adapter, session.cfg, iteration)
    ladders = plan_ladders(session.adapter, centres, steps, session.cfg.supernet.num_levels)
    ledger_path = build_ledger_path(directory)
    if not (Path(directory) / MANIFEST).is_file():  # a build from scratch: the store accepts only its files
        ledger_path.unlink(missing_ok=True)
    store = SupernetStore.create_or_resume(directory, supernet_fingerprint(session, ladders), force=force)
    plan = build_plan(session.cfg, ladders)
    if workers is not None:
        report = workers.build_supernet(session.adapter, session.calibration.shape[0], plan, store, progress)
    else:
        offload = build_offload(session.cfg, Path(directory), session.device)
        report = build_supernet(
            session.model,
            session.adapter,
            session.calibration,
            plan,
            store,
            progress=progress,
            offload=offload,
        )
    num_sequences, seq_len = session.calibration.shape
    atomic_write_json(ledger_path, {"num_sequences": num_sequences, "seq_len": seq_len, **report.ledger})
    return store, report


def describe_supernet(session: Session, store: SupernetStore, report: BuildReport) -> str:
    """A short human summary of a built supernet."""
    adapter = session.adapter
    lines = [
        f"supernet: {store.directory}",
        f"  model {session.resolved.source}: {adapter.num_layers} blocks, {adapter.num_heads} heads "
        f"({adapter.num_kv_heads} KV), {adapter.intermediate_size} MLP channels",
        f"  calibration: {session.calibration.shape[0]} x {session.calibration.shape[1]} tokens",
        f"  genes built {report.genes_built}, reused {report.genes_reused}; "
        f"{report.seconds:.1f} s ({report.seconds_pruning:.1f} s in the local pruner)",
    ]
    for kind, unit in (("attn", "heads"), ("mlp", "channels")):
        ladder = store.ladder(genes_of(adapter.num_layers)[0 if kind == "attn" else 1])
        kept = [ladder.num_units - ladder.removed(lv) for lv in ladder.levels]
        lines.append(
            f"  {kind}: {len(ladder.levels)} levels, step {ladder.step} {unit}; "
            f"block 0 keeps {kept} of {ladder.num_units} {unit}"
        )
    size = sum(p.stat().st_size for p in Path(store.directory).rglob("*.safetensors"))
    lines.append(f"  variants on disk: {size / 2**20:.1f} MiB")
    return "\n".join(lines)


def max_module_params(adapter: ModelAdapter, kind: str, num_kept: int) -> int:
    """Most parameters a module with `num_kept` units can keep (attention: kept heads spread over KV groups)."""
    if kind == "mlp":
        return adapter.mlp_params(num_kept)
    # Round-robin over KV groups keeps min(num_kept, num_kv_heads) KV heads: the most any choice can keep.
    units = adapter.units("attn")
    order = [
        kv * units.heads_per_kv + j for j in range(units.heads_per_kv) for kv in range(units.num_kv_heads)
    ]
    return adapter.attention_params(order[:num_kept])


def architecture(session: Session, store: SupernetStore, genome: tuple[int, ...], target: float) -> dict:
    """`architecture.json` for `genome` on `store`, with exact parameter counts.

    Computed by the export's code (`tyr.export.architecture`) from the manifest alone: a level's recorded
    parameter count exceeds its units' count exactly when its variant adds an output bias (FLAP).
    """
    from tyr.export.architecture import compute_architecture, genome_shapes

    adapter = session.adapter
    genes = genes_of(adapter.num_layers)
    entries = [store.level_entry(g, lv) for g, lv in zip(genes, genome, strict=True)]
    kept = [e.kept for e in entries]
    adds_bias = [e.params > adapter.module_params(g.kind, e.kept) for g, e in zip(genes, entries)]
    shapes = genome_shapes(adapter, kept, adds_bias)
    return compute_architecture(session.model, adapter, shapes, session.resolved.source, target)
