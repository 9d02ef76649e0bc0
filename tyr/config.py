"""Typed run configuration: YAML file + `--set key=value` overrides, unknown keys rejected.

One dataclass per stage, nested in `RunConfig`. The resolved config is written to `RUN/config.yaml` and is the
run's identity: its hash goes into every fingerprint.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import string
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from tyr.errors import TyrError

Accumulation = Literal["expectation", "uniform_mean", "center", "none"]
ACCUMULATION_MODES = ("expectation", "uniform_mean", "center", "none")


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # local HF folder, hub id, or the built-in alias smollm2-135m
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto = cuda if available, else cpu
    num_layers: int | None = None  # keep only the first N blocks (quick checks and smoke tests); None = all
    # Where the weights live (not run identity; tyr/models.py): single = all on `device`; balanced = the decoder
    # blocks spread evenly over every visible GPU; offload = weights in host RAM, one block at a time lent to
    # `device` (a 70B model's build and teacher pass on one 80 GB GPU; fitness is slow: a copy per block per batch).
    placement: Literal["single", "balanced", "offload"] = "single"


@dataclass
class DataConfig:
    calibration: str = (
        "lee-background"  # built-in alias, local file/folder (txt/json/jsonl/parquet), or hub dataset
    )
    calibration_config: str | None = None  # hub dataset config name (e.g. wikitext-2-raw-v1)
    calibration_split: str = "train"
    eval: str = "lee"  # held-out evaluation data, same forms as `calibration`
    eval_config: str | None = None
    eval_split: str = "test"
    text_field: str = "text"
    num_sequences: int = 64  # calibration sequences
    seq_len: int = 512
    # Held-out validation windows: the next ones of the seeded permutation the calibration windows are drawn
    # from (those stay exactly the same), with their own teacher targets. Never used to build the supernet or
    # in selection: they pick each iteration's result and the final model (the best validation KL). 0 = none.
    num_validation_sequences: int = 0
    num_eval_sequences: int | None = None  # None = every full window of the eval data
    # Read at most this many tokens of the calibration source (hub datasets are then streamed, so only that
    # much is downloaded); the calibration windows are drawn from them. None = the whole source.
    max_source_tokens: int | None = None


@dataclass
class SupernetConfig:
    num_levels: int = 9  # ladder size per gene (odd: centre ± (num_levels-1)/2 steps)
    attn_step: float = 0.125  # step as a fraction of the module's units in iteration 1 (halved per iteration)
    mlp_step: float = 0.125
    min_attn_step: int = 1  # step clamps, in units
    min_mlp_step: int = 32
    channel_multiple: int = 32  # MLP channel counts are rounded to this multiple
    accumulation: Accumulation = "expectation"
    # Local pruning criterion (supernet/criteria.py): tyr = second-order OBS + least-squares refit (the
    # default); magnitude, wanda-sp and flap are the score-only baselines (flap adds a bias compensation).
    criterion: str = "tyr"  # a name registered in tyr.supernet.criteria.CRITERIA
    damp: float = 0.01
    # The ridge refit's target (criterion tyr): zero solves Hd[K,K] W_K = (H W)[K], shrinking kept weights toward
    # zero (what runs stored before this key did); dense solves Hd[K,K] W_K = (Hd W)[K], shrinking them toward
    # the dense weights (the official Týr code; the presets' choice: lower validation KL in
    # benchmarks/search_quality.py). tyr.supernet.pruner has the details.
    refit: Literal["zero", "dense"] = "zero"
    use_hessian: bool = True  # ablation switches of the local pruner (paper Table 7)
    # Off by default: the signed first-order term of the official code (Σ W_g ⊙ G_g, G = H·W) measurably hurts
    # here (SmolLM2-135M, 50%, uniform structure: held-out ppl 152.4 with it, 116.2 without).
    use_first_order: bool = False
    attn_rounds: int | None = None  # None = one head per round (paper)
    mlp_rounds: int | None = 16  # official code: channels in 16 equal rounds
    batch_size: int = 8  # sequences per forward chunk while capturing activations
    storage_dtype: str = "auto"  # dtype of stored variants; auto = the model's dtype
    # Where the build keeps the calibration hidden states (not run identity: every mode builds the same
    # supernet). host: host RAM, pinned on a GPU, and the device holds one batch_size chunk at a time, so
    # device memory does not grow with data.num_sequences (a second pass recomputes each projection input);
    # disk: a memory-mapped file in offload_dir (host RAM stays flat too); none: everything on the model's
    # device (the fastest; the paper's 8B setting needs ~191 GiB there). auto (default): host on a GPU,
    # none on the CPU (where the "device" is host RAM anyway and none saves the second pass).
    offload: Literal["auto", "host", "disk", "none"] = "auto"
    offload_dir: str | None = None  # folder for offload=disk's file; None = RUN/iter-N/supernet-offload/
    hessian_tf32: bool = False  # TF32 matmuls for the Hessians (CUDA only; changes the numbers slightly)
    # dtype of the local pruner's solves: float32 is the fast path on GPUs with a low float64 rate
    solve_dtype: Literal["float64", "float32"] = "float64"


@dataclass
class SearchConfig:
    """Coarse-to-fine evolutionary search (ALGORITHM §5-6). Presets: see `tyr.schedules`."""

    # evolution = the EvoPress-style search below; uniform/owl/layer-error are one-shot allocations from
    # iteration 1's supernet; random/optuna search with as many fitness evaluations as the evolution would use.
    method: str = "evolution"  # a name registered in tyr.methods.METHODS
    num_iterations: int = 2
    generations: list[int] = field(default_factory=lambda: [6, 4])  # per iteration
    num_offspring: int = 16
    max_mutations: int = 4  # n = min(U{1..max}, U{1..max}) level switches per child
    # [survivors, tokens] per selection stage, for every iteration; or one such list per iteration
    stages: list[list[int]] | list[list[list[int]]] = field(
        default_factory=lambda: [[4, 512], [2, 1024], [1, 4096]]
    )
    # paired: the parent is scored on every stage's batch beside its children, and is replaced only by a child
    # that beats it there (tyr.search.evolution); legacy: the parent joins the last stage only (runs stored
    # before this key existed). The presets set paired.
    selection: Literal["paired", "legacy"] = "legacy"
    # With data.num_validation_sequences: also measure the search's parent every N generations (0: only the
    # start and the last parent); an iteration's result is the best validation KL among those measured.
    validate_every: int = 0
    budget: Literal["per_type", "joint"] = "per_type"
    topk: int = 512  # teacher logits kept per token for the KL fitness
    # kl: the fitness is the top-K KL alone (as in the official code). kl+hidden (paper Eq. 6) adds hidden_weight
    # x the relative squared error of the outputs of the first, middle and last decoder blocks against the dense
    # teacher's (tyr.evaluators.hidden; stored once in RUN/teacher-hidden/, N x T x 3 x hidden x 2 bytes).
    # Validation KL (the choice of an iteration's result) stays KL alone.
    fitness: Literal["kl", "kl+hidden"] = "kl"
    hidden_weight: float = 1.0
    realisation: Literal["compact", "masked"] = "compact"
    batch_size: int = 8  # sequences per forward pass during fitness evaluation
    max_level_distance: int | None = None
    owl_lambda: float = 0.08  # OWL: layer sparsities spread over [s - lambda, s + lambda]
    owl_threshold: float = 5.0  # OWL: a score is an outlier above threshold x its layer's mean score
    # Bytes of supernet variants a fitness backend keeps loaded (per process; not run identity: it changes
    # only I/O). None = auto: the whole iteration's supernet when it fits in half the available host memory
    # (shared by the Ray workers of a machine), else an LRU of that size.
    variant_cache_bytes: int | None = None
    # Bytes of those variants kept on the model's GPU, so a gene swap is a copy on the device rather than a
    # host-to-device transfer (per process; not run identity). None = auto: the whole supernet when it fits in
    # 40% of the GPU's free memory at the search's start, else none. Nothing on CPUs or spread-out models.
    variant_device_bytes: int | None = None
    # Bytes of decoder-block outputs of a reference genome (the parent, in paired selection) kept per fitness
    # call, so a candidate runs from its first changed block (tyr.search.prefix). On the model's device; not
    # run identity: fitness values are bit-identical with and without it. 0 = off. On Ray, per worker: the
    # reference is chosen among the candidates of each chunk of work units the worker gets.
    prefix_cache_bytes: int = 0

    def stages_for(self, iteration: int) -> list[list[int]]:
        """The [survivors, tokens] stages of iteration `iteration` (1-based)."""
        return self.stages[iteration - 1] if per_iteration_stages(self.stages) else self.stages


def per_iteration_stages(stages: list) -> bool:
    """Whether `search.stages` lists one stage list per iteration (rather than one list for all)."""
    return bool(stages) and all(isinstance(st, list) and st and isinstance(st[0], list) for st in stages)


@dataclass
class BackendConfig:
    """Where fitness evaluations run (docs/ray.md). Not part of the run's identity: results do not depend on it."""

    kind: Literal["serial", "ray"] = "serial"
    address: str | None = (
        None  # None: a local Ray instance (or $RAY_ADDRESS); auto; host:6379; ray://host:10001
    )
    num_workers: int = 1
    num_cpus_per_worker: float = 1.0
    # auto: 1 GPU per worker when the cluster has GPUs, else 0 (CPU workers). An explicit 0 on a cluster with
    # GPUs is refused unless allow_cpu_workers (CPU fitness there is almost always a mistake).
    num_gpus_per_worker: float | Literal["auto"] = "auto"
    allow_cpu_workers: bool = False
    max_retries: int = 2
    # A call (a chunk of work units) unanswered this long: its actor is taken as hung, killed and replaced,
    # and its units re-run elsewhere. None (default): wait as long as it takes. Set it to several times the
    # longest call you expect (on the paper schedule one unit is one forward of batch_size sequences).
    call_timeout_s: float | None = None
    # How long an actor (a first one or a replacement) may take to be placed on a node and load the model
    # before it is given up: at the start the run stops with an error; mid-search the slot is retired.
    startup_timeout_s: float = 900.0
    # Where `tyr run`'s driver loads the model: auto (model.device) or cpu. With Ray the workers run every
    # forward pass (teacher passes, builds, search, final metrics), so `cpu` frees the driver's GPU; the model is
    # then kept in host RAM in the dtype GPU workers use (model.dtype; auto: bfloat16), and the workers load the
    # driver's dtype. (search.fitness=kl+hidden still computes its teacher hidden states on the driver.)
    driver_device: Literal["auto", "cpu"] = "auto"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    schedule: str = "cpu"  # preset the other values start from: paper, cpu or smoke (see tyr/schedules.py)
    sparsity: float = 0.5  # target fraction of prunable units removed per module type
    seed: int = 0
    backend: BackendConfig = field(default_factory=BackendConfig)  # last: config.yaml omits it (not identity)

    def validate(self) -> None:
        """Checks that need no model: every setting's range, enumerations and names. Raises TyrError."""
        _check_finite(self)
        if not (0.0 <= self.sparsity < 1.0):
            raise TyrError(f"sparsity must be in [0, 1), got {self.sparsity}")
        _at_least("seed", self.seed, 0)  # numpy's generators take non-negative seeds only
        _validate_model(self.model)
        _validate_data(self.data)
        _validate_supernet(self.supernet)
        self._validate_search()
        _validate_backend(self.backend)

    def validate_for_model(self, num_units: dict[str, int], num_layers: int) -> None:
        """Checks that need the model's shapes (units per module type, number of blocks); cheap, so they run
        before any heavy work. Raises TyrError.

        The searching methods move units between modules by level switches (one module a level denser, another
        a level sparser, ALGORITHM §5), so iteration 1's ladders around the target must allow at least one; a
        sparsity that rounds to removing no unit, or every unit, of every module leaves nothing to allocate.
        """
        from tyr.methods import is_one_shot

        searching = not is_one_shot(self.search.method) and any(self.search.generations)
        if has_level_switch(self, num_units, num_layers, searching):
            return
        usable = usable_sparsities(self, num_units, num_layers, searching)
        removed = _removed_per_block(self, num_units)
        what = "the search has no level switch to make" if searching else "there is nothing to allocate"
        message = (
            f"sparsity {self.sparsity:g} removes {removed['attn']} of {num_units['attn']} attention heads and "
            f"{removed['mlp']} of {num_units['mlp']} MLP channels per block: {what}; "
        )
        if usable:
            ranges = " or ".join(f"({_round(lo, math.ceil)}, {_round(hi, math.floor)}]" for lo, hi in usable)
            settings = " with these supernet ladder settings" if searching else ""
            raise TyrError(message + f"use a sparsity in {ranges} for this model{settings}")
        if self.supernet.num_levels < 3:
            fix = "supernet.num_levels >= 3"
        elif num_layers < 2 and self.search.budget == "per_type":
            fix = "more than one block (model.num_layers) or search.budget=joint"
        else:
            fix = "smaller supernet.min_attn_step / min_mlp_step / channel_multiple"
        raise TyrError(
            message + f"no sparsity gives this model a level switch with these settings: use {fix}, or a "
            "one-shot search.method (uniform, owl, layer-error)"
        )

    def _validate_search(self) -> None:
        se = self.search
        if se.num_iterations < 1:
            raise TyrError(f"search.num_iterations must be >= 1, got {se.num_iterations}")
        if len(se.generations) != se.num_iterations or any(g < 0 for g in se.generations):
            raise TyrError(
                f"search.generations must list {se.num_iterations} non-negative counts (one per iteration), "
                f"got {se.generations}"
            )
        if per_iteration_stages(se.stages) and len(se.stages) != se.num_iterations:
            raise TyrError(
                f"search.stages lists {len(se.stages)} stage lists but search.num_iterations is "
                f"{se.num_iterations}: give one list of [survivors, tokens] pairs per iteration, or one for all"
            )
        stage_lists = [se.stages_for(i) for i in range(1, se.num_iterations + 1)]
        if any(len(st) != 2 for stages in stage_lists for st in stages):
            raise TyrError(f"search.stages must be a list of [survivors, tokens] pairs, got {se.stages}")
        if se.selection not in ("paired", "legacy"):
            raise TyrError(f"search.selection must be one of paired, legacy, got {se.selection!r}")
        if se.fitness not in ("kl", "kl+hidden"):
            raise TyrError(f"search.fitness must be one of kl, kl+hidden, got {se.fitness!r}")
        if se.hidden_weight < 0:
            raise TyrError(f"search.hidden_weight must be >= 0, got {se.hidden_weight}")
        _at_least("search.validate_every", se.validate_every, 0)
        for name in ("num_offspring", "max_mutations", "topk", "batch_size"):
            _at_least(f"search.{name}", getattr(se, name), 1)
        _at_least("search.max_level_distance", se.max_level_distance, 1)
        _at_least("search.variant_cache_bytes", se.variant_cache_bytes, 0)
        if se.variant_device_bytes is not None:
            _at_least("search.variant_device_bytes", se.variant_device_bytes, 0)
        _at_least("search.prefix_cache_bytes", se.prefix_cache_bytes, 0)
        if not (0.0 <= se.owl_lambda < 1.0) or se.owl_threshold <= 0:
            raise TyrError(
                f"search.owl_lambda must be in [0, 1) and search.owl_threshold > 0, got {se.owl_lambda} and "
                f"{se.owl_threshold}"
            )
        from tyr.methods import METHODS

        if se.method not in METHODS:
            raise TyrError(f"search.method must be one of {', '.join(METHODS)}, got {se.method!r}")
        if not METHODS[se.method].joint_budget and se.budget != "per_type":
            raise TyrError(
                f"search.method={se.method} allocates under search.budget=per_type only (it holds each module "
                "type's unit count exactly); set search.budget=per_type or use method evolution"
            )
        tokens = self.data.num_sequences * self.data.seq_len
        for iteration, stages in enumerate(stage_lists, start=1):
            where = f" (iteration {iteration})" if per_iteration_stages(se.stages) else ""
            if not METHODS[se.method].one_shot:
                _validate_stages(se, stages, where)
            if stages and max(st[1] for st in stages) > tokens:
                raise TyrError(
                    f"search.stages{where} ask for up to {max(st[1] for st in stages)} tokens per stage but the "
                    f"calibration set has {tokens} (data.num_sequences x data.seq_len); lower the stage tokens or "
                    "add data"
                )


# Names accepted by model.dtype and supernet.storage_dtype (besides auto), with the torch dtype each means.
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def _at_least(where: str, value: int | float | None, minimum: int | float) -> None:
    """TyrError unless `value` is None (where the setting allows it) or >= `minimum`."""
    if value is not None and value < minimum:
        raise TyrError(f"{where} must be >= {minimum}, got {value}")


def _check_finite(cfg: Any, where: str = "") -> None:
    """TyrError for a NaN or infinite float anywhere in `cfg` (YAML reads .nan and .inf as floats)."""
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), _join(where, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, name)
        elif isinstance(value, float) and not math.isfinite(value):
            raise TyrError(f"{name} must be a finite number, got {value}")


def _check_dtype(where: str, name: str) -> None:
    if name != "auto" and name not in DTYPES:
        raise TyrError(f"{where}: unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")


def _validate_model(m: ModelConfig) -> None:
    _check_dtype("model.dtype", m.dtype)
    if m.placement not in ("single", "balanced", "offload"):
        raise TyrError(f"model.placement must be one of single, balanced, offload, got {m.placement!r}")
    _at_least("model.num_layers", m.num_layers, 1)


def _validate_data(d: DataConfig) -> None:
    _at_least("data.num_sequences", d.num_sequences, 1)
    _at_least("data.seq_len", d.seq_len, 2)
    _at_least("data.num_eval_sequences", d.num_eval_sequences, 1)  # None = every window
    _at_least("data.max_source_tokens", d.max_source_tokens, 1)
    _at_least("data.num_validation_sequences", d.num_validation_sequences, 0)
    needed = (d.num_sequences + d.num_validation_sequences) * d.seq_len
    if d.max_source_tokens is not None and d.max_source_tokens < needed:
        raise TyrError(
            f"data.max_source_tokens={d.max_source_tokens} is below the {needed} calibration tokens "
            "asked for ((data.num_sequences + data.num_validation_sequences) x data.seq_len)"
        )


def _validate_supernet(sn: SupernetConfig) -> None:
    if sn.num_levels < 1 or sn.num_levels % 2 == 0:
        raise TyrError(f"supernet.num_levels must be a positive odd number, got {sn.num_levels}")
    from tyr.supernet.criteria import CRITERIA

    if sn.criterion not in CRITERIA:
        raise TyrError(f"supernet.criterion must be one of {', '.join(CRITERIA)}, got {sn.criterion!r}")
    if sn.accumulation not in ACCUMULATION_MODES:
        raise TyrError(f"supernet.accumulation must be one of {', '.join(ACCUMULATION_MODES)}")
    for name in ("attn_step", "mlp_step"):
        if not (0.0 < getattr(sn, name) <= 1.0):
            raise TyrError(f"supernet.{name} must be in (0, 1], got {getattr(sn, name)}")
    for name in ("min_attn_step", "min_mlp_step", "channel_multiple", "batch_size"):
        _at_least(f"supernet.{name}", getattr(sn, name), 1)
    for name in ("attn_rounds", "mlp_rounds"):  # None = one unit per round
        _at_least(f"supernet.{name}", getattr(sn, name), 1)
    _at_least("supernet.damp", sn.damp, 0)
    if sn.refit not in ("zero", "dense"):
        raise TyrError(f"supernet.refit must be zero or dense, got {sn.refit!r}")
    if sn.refit != "zero" and (sn.criterion != "tyr" or not sn.use_hessian):
        raise TyrError(
            f"supernet.refit={sn.refit} changes the least-squares refit of criterion tyr with use_hessian on; "
            f"criterion {sn.criterion!r}{'' if sn.use_hessian else ' without the Hessian'} does not refit: "
            "leave supernet.refit at zero"
        )
    _check_dtype("supernet.storage_dtype", sn.storage_dtype)
    if sn.offload_dir is not None and (
        not sn.offload_dir.strip() or Path(sn.offload_dir).expanduser().is_file()
    ):
        raise TyrError(
            f"supernet.offload_dir must name a folder (it may not exist yet), got {sn.offload_dir!r}"
        )


def _validate_stages(se: SearchConfig, stages: list[list[int]], where: str = "") -> None:
    """One iteration's selection stages as the evolution (and the samplers, which match its budget) will check
    them."""
    from tyr.search.evolution import EvolutionConfig, Stage

    evo = EvolutionConfig(
        1,
        se.num_offspring,
        tuple(Stage(int(s), int(t)) for s, t in stages),
        se.max_mutations,
        se.max_level_distance,
    )
    try:
        evo.validate()
    except TyrError as e:
        raise TyrError(f"{e}{where}") from None


def _validate_backend(b: BackendConfig) -> None:
    if b.num_gpus_per_worker != "auto" and not (
        isinstance(b.num_gpus_per_worker, (int, float)) and not isinstance(b.num_gpus_per_worker, bool)
    ):
        raise TyrError(f"backend.num_gpus_per_worker must be auto or a number, got {b.num_gpus_per_worker!r}")
    gpus = 0 if b.num_gpus_per_worker == "auto" else b.num_gpus_per_worker
    if b.num_workers < 1 or b.num_cpus_per_worker < 0 or gpus < 0 or b.max_retries < 0:
        raise TyrError("backend: num_workers must be >= 1; CPU/GPU requests and max_retries must be >= 0")
    if b.call_timeout_s is not None and not b.call_timeout_s > 0:
        raise TyrError(f"backend.call_timeout_s must be > 0 (or null: no timeout), got {b.call_timeout_s}")
    if not b.startup_timeout_s > 0:
        raise TyrError(f"backend.startup_timeout_s must be > 0, got {b.startup_timeout_s}")
    if b.address is not None:
        ray_host_port(b.address)


def ray_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray cluster address `host:port` or `ray://host:port`; None for `auto`.

    A pure syntax check (nothing is contacted), so that a typo is refused before any work. TyrError otherwise.
    """
    if address == "auto":
        return None
    bad = TyrError(
        f"Ray address {address!r} is not of the form host:port, ray://host:port or 'auto' "
        "(e.g. 10.0.0.1:6379 or ray://head-node:10001)"
    )
    hostport = address
    if "://" in address:
        try:
            parts = urlsplit(address)
        except ValueError:  # e.g. an unclosed IPv6 bracket
            raise bad from None
        if parts.scheme != "ray" or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise bad
        hostport = parts.netloc
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise bad
    if host.startswith("[") and host.endswith("]"):  # IPv6 literal
        host = host[1:-1]
        if not host or not set(host) <= set("0123456789abcdefABCDEF:."):
            raise bad
    elif not host or not set(host) <= set(string.ascii_letters + string.digits + ".-_"):
        raise bad
    return host, int(port)


# -- sparsities a model can take (validate_for_model) -------------------------------------------------------------


def _removed_per_block(cfg: RunConfig, num_units: dict[str, int]) -> dict[str, int]:
    """Units removed per module at the target (iteration 1's ladder centres), per module type."""
    from tyr.supernet.ladder import centre_for_sparsity

    multiple = {"attn": 1, "mlp": cfg.supernet.channel_multiple}
    return {kind: centre_for_sparsity(n, cfg.sparsity, multiple[kind]) for kind, n in num_units.items()}


def _switch_steps(cfg: RunConfig, num_units: dict[str, int], searching: bool) -> dict[str, int]:
    """Iteration 1's ladder step per module type (searching), else 1 unit (something to allocate at all)."""
    from tyr.supernet.ladder import step_units

    if not searching:
        return {kind: 1 for kind in num_units}
    sn = cfg.supernet
    return {
        "attn": step_units(num_units["attn"], sn.attn_step, sn.min_attn_step),
        "mlp": step_units(num_units["mlp"], sn.mlp_step, sn.min_mlp_step, sn.channel_multiple),
    }


def _switch_pairs(cfg: RunConfig, num_units: dict[str, int], num_layers: int, searching: bool) -> list:
    """(denser type, sparser type) pairs a level switch may combine: the same type (per_type budget; needs
    two blocks when searching), or any two types (joint budget)."""
    if searching and cfg.supernet.num_levels < 3:  # a ladder of one level has no neighbour
        return []
    pairs = [(k, k) for k in num_units] if num_layers >= 2 or not searching else []
    if searching and cfg.search.budget == "joint":
        pairs += [(a, b) for a in num_units for b in num_units if a != b]
    return pairs


def has_level_switch(cfg: RunConfig, num_units: dict[str, int], num_layers: int, searching: bool) -> bool:
    """Whether iteration 1's start (every module at the target) allows one level switch: a module one level
    denser (c >= step) and another one level sparser (c + step <= n), as `tyr.supernet.ladder` builds them."""
    removed = _removed_per_block(cfg, num_units)
    steps = _switch_steps(cfg, num_units, searching)
    return any(
        removed[a] >= steps[a] and removed[b] + steps[b] <= num_units[b]
        for a, b in _switch_pairs(cfg, num_units, num_layers, searching)
    )


def usable_sparsities(
    cfg: RunConfig, num_units: dict[str, int], num_layers: int, searching: bool
) -> list[tuple[float, float]]:
    """The sparsities s at which `has_level_switch` holds, as disjoint intervals (lo, hi].

    The centre removes c(s) = m * ceil(s * n / m) of a module's n units (m: the type's rounding multiple), so
    c >= step for s > (ceil(step / m) - 1) * m / n and c + step <= n for s <= floor((n - step) / m) * m / n.
    """
    multiple = {"attn": 1, "mlp": cfg.supernet.channel_multiple}
    steps = _switch_steps(cfg, num_units, searching)
    lo = {k: (math.ceil(steps[k] / multiple[k]) - 1) * multiple[k] / n for k, n in num_units.items()}
    hi = {k: math.floor((n - steps[k]) / multiple[k]) * multiple[k] / n for k, n in num_units.items()}
    pairs = _switch_pairs(cfg, num_units, num_layers, searching)
    return _merge([(lo[a], hi[b]) for a, b in pairs if lo[a] < hi[b]])


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _round(x: float, direction: Callable[[float], float]) -> str:
    """`x` to 4 decimals, rounded inwards so that the printed range holds only usable values."""
    return f"{direction(x * 1e4 + (1e-6 if direction is math.floor else -1e-6)) / 1e4:g}"


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise TyrError(
            f"config section '{where or 'top level'}' must be a mapping, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TyrError(
            f"unknown config key(s) {', '.join(_join(where, k) for k in unknown)}; "
            f"valid keys{' in ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {key: _coerce(hints[key], value, _join(where, key)) for key, value in data.items()}
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except TyrError as e:
                errors.append(str(e))
        # "X must be A, got v" and "X must be B, got v" -> "X must be A or B, got v"
        wanted = [e[len(f"{where} must be ") : e.rindex(", got ")] for e in errors if ", got " in e]
        if len(wanted) == len(errors) > 1 and all(e.startswith(f"{where} must be ") for e in errors):
            raise TyrError(f"{where} must be {' or '.join(wanted)}, got {value!r}")
        raise TyrError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise TyrError(
                f"{where} must be one of {', '.join(map(str, typing.get_args(tp)))}, got {value!r}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TyrError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (
        not isinstance(value, tp) or (tp is int and isinstance(value, bool))
    ):
        kind = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}[tp]
        raise TyrError(f"{where} must be {kind}, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file. TyrError for a missing path, a folder, unreadable or non-UTF-8
    bytes, invalid YAML, or a top level that is no mapping."""
    path = Path(path)
    if path.is_dir():
        raise TyrError(f"config file {path} is a directory; give the path of a YAML file")
    if not path.is_file():
        raise TyrError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise TyrError(
            f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); is it YAML?"
        ) from None
    except OSError as e:
        raise TyrError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise TyrError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise TyrError(f"config file {path} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` strings (values parsed as YAML scalars) to a nested dict."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise TyrError(f"--set expects key=value, got {item!r}")
        value = yaml.safe_load(raw) if raw else ""
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return data


def resolve_config(path: str | None, overrides: list[str]) -> RunConfig:
    """Schedule preset → YAML file (optional) → `--set` overrides → typed, validated RunConfig."""
    from tyr.schedules import preset

    user = load_yaml(path) if path else {}
    user = apply_overrides(user, overrides)
    schedule = user.get("schedule", RunConfig.schedule)
    data = _deep_merge(preset(schedule), user)
    data["schedule"] = schedule
    _drop_inapplicable_refit(data, user)
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg


def _drop_inapplicable_refit(data: dict, user: dict) -> None:
    """The presets' `supernet.refit` applies to criterion tyr with the Hessian only: with another criterion the
    preset's value gives way to the default (a refit the user sets explicitly is still checked, and refused)."""
    supernet, user_supernet = data.get("supernet"), user.get("supernet")
    if not isinstance(supernet, dict) or (isinstance(user_supernet, dict) and "refit" in user_supernet):
        return
    if supernet.get("criterion", "tyr") != "tyr" or supernet.get("use_hessian", True) is False:
        supernet.pop("refit", None)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Settings that cannot change a result (where fitness runs, how memory is placed, logging): not part of a
# run's identity, so a run may be resumed with other values. Dotted keys name one setting of a section.
# The held-out evaluation (data.eval*) is measured after the search and recorded in final/metrics.json with
# a hash of its tokens; changing it re-measures a finished run instead of orphaning it.
IDENTITY_EXCLUDED = (
    "backend",
    "data.eval",
    "data.eval_config",
    "data.eval_split",
    "data.num_eval_sequences",
    "model.placement",
    "supernet.offload",
    "supernet.offload_dir",
    "search.variant_cache_bytes",
    "search.variant_device_bytes",
    "search.prefix_cache_bytes",
)


def identity_dict(cfg: Any) -> dict:
    """The config minus the settings in IDENTITY_EXCLUDED."""
    out = to_dict(cfg)
    for key in IDENTITY_EXCLUDED:
        section, _, name = key.rpartition(".")
        node = out.get(section, {}) if section else out
        node.pop(name, None)
    return out


def dump_yaml(cfg: Any) -> str:
    """The run's identity as YAML (written to RUN/config.yaml, whose hash is in every checkpoint)."""
    return yaml.safe_dump(identity_dict(cfg), sort_keys=False)


# Identity keys whose presets set another value than their default (the default reproduces runs stored before
# the key existed). Re-running an older run's own command after an upgrade resolves the preset's new value; a
# run whose stored config lacks such a key therefore continues with the default, as it began, unless the
# command asks for something that is neither (then the configs differ).
PRESET_UPGRADES = (
    "search.selection",
    "search.validate_every",
    "data.num_validation_sequences",
    "supernet.refit",
)


def _lookup(data: dict, key: str, missing: Any = None) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def upgraded_keys(stored: dict, current: dict) -> list[str]:
    """The PRESET_UPGRADES keys `stored` (a run's config.yaml) lacks while `current` (this command's identity
    dict) holds its preset's value for them: the run keeps their defaults."""
    from tyr.schedules import PRESETS

    schedule = current.get("schedule")
    preset = PRESETS.get(schedule, {}) if isinstance(schedule, str) else {}
    absent = object()
    return [
        key
        for key in PRESET_UPGRADES
        if _lookup(stored, key, absent) is absent and _lookup(preset, key, absent) == _lookup(current, key)
    ]


def _default(key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(RunConfig(), section), name)


def resumed_identity(stored: dict, current: dict) -> dict:
    """`current` with the `upgraded_keys` at their defaults: what a run stored as `stored` continues with."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in current.items()}
    for key in upgraded_keys(stored, current):
        section, name = key.split(".")
        out[section][name] = _default(key)
    return out


def resumed_config(cfg: RunConfig, stored: dict) -> tuple[RunConfig, list[str]]:
    """(`cfg` with the `upgraded_keys` of the run stored as `stored` at their defaults, those keys)."""
    keys = upgraded_keys(stored, identity_dict(cfg))
    cfg = copy.deepcopy(cfg) if keys else cfg
    for key in keys:
        section, name = key.split(".")
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **{name: _default(key)}))
    return cfg, keys


def config_from_stored(stored: dict, where: str = "config.yaml") -> RunConfig:
    """The RunConfig of a stored config.yaml: keys it lacks (written before they existed) read as their
    defaults, which reproduce the older behaviour. TyrError for unknown keys or bad values."""
    try:
        return from_dict(RunConfig, stored)
    except TyrError as e:
        raise TyrError(f"{where}: {e}") from None
