"""Typed run configuration: YAML file + `--set key=value` overrides, unknown keys rejected.

One dataclass per stage, nested in `RunConfig`. The resolved config is written to `RUN/config.yaml` and is the
run's identity: its hash goes into every fingerprint.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    use_hessian: bool = True  # ablation switches of the local pruner (paper Table 7)
    # Off by default: the signed first-order term of the official code (Σ W_g ⊙ G_g, G = H·W) measurably hurts
    # here (SmolLM2-135M, 50%, uniform structure: held-out ppl 152.4 with it, 116.2 without).
    use_first_order: bool = False
    attn_rounds: int | None = None  # None = one head per round (paper)
    mlp_rounds: int | None = 16  # official code: channels in 16 equal rounds
    batch_size: int = 8  # sequences per forward chunk while capturing activations
    storage_dtype: str = "auto"  # dtype of stored variants; auto = the model's dtype


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
    stages: list[list[int]] = field(
        default_factory=lambda: [[4, 512], [2, 1024], [1, 4096]]
    )  # [survivors, tokens]
    budget: Literal["per_type", "joint"] = "per_type"
    topk: int = 512  # teacher logits kept per token for the KL fitness
    realisation: Literal["compact", "masked"] = "compact"
    batch_size: int = 8  # sequences per forward pass during fitness evaluation
    max_level_distance: int | None = None
    owl_lambda: float = 0.08  # OWL: layer sparsities spread over [s - lambda, s + lambda]
    owl_threshold: float = 5.0  # OWL: a score is an outlier above threshold x its layer's mean score


@dataclass
class BackendConfig:
    """Where fitness evaluations run (docs/ray.md). Not part of the run's identity: results do not depend on it."""

    kind: Literal["serial", "ray"] = "serial"
    address: str | None = (
        None  # None: a local Ray instance (or $RAY_ADDRESS); auto; host:6379; ray://host:10001
    )
    num_workers: int = 1
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    max_retries: int = 2


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
        """Checks that need no model: ranges and enumerations. Raises TyrError."""
        if not (0.0 <= self.sparsity < 1.0):
            raise TyrError(f"sparsity must be in [0, 1), got {self.sparsity}")
        sn = self.supernet
        if sn.num_levels < 1 or sn.num_levels % 2 == 0:
            raise TyrError(f"supernet.num_levels must be a positive odd number, got {sn.num_levels}")
        if not (0.0 <= self.search.owl_lambda < 1.0) or self.search.owl_threshold <= 0:
            raise TyrError("search.owl_lambda must be in [0, 1) and search.owl_threshold > 0")
        from tyr.supernet.criteria import CRITERIA

        if sn.criterion not in CRITERIA:
            raise TyrError(f"supernet.criterion must be one of {', '.join(CRITERIA)}, got {sn.criterion!r}")
        if sn.accumulation not in ACCUMULATION_MODES:
            raise TyrError(f"supernet.accumulation must be one of {', '.join(ACCUMULATION_MODES)}")
        for name in ("attn_step", "mlp_step"):
            if not (0.0 < getattr(sn, name) <= 1.0):
                raise TyrError(f"supernet.{name} must be in (0, 1], got {getattr(sn, name)}")
        for name in ("min_attn_step", "min_mlp_step", "channel_multiple", "batch_size"):
            if getattr(sn, name) < 1:
                raise TyrError(f"supernet.{name} must be >= 1, got {getattr(sn, name)}")
        if sn.damp < 0 or not math.isfinite(sn.damp):
            raise TyrError(f"supernet.damp must be >= 0, got {sn.damp}")
        if self.data.num_sequences < 1 or self.data.seq_len < 2:
            raise TyrError("data.num_sequences must be >= 1 and data.seq_len >= 2")
        needed = self.data.num_sequences * self.data.seq_len
        if self.data.max_source_tokens is not None and self.data.max_source_tokens < needed:
            raise TyrError(
                f"data.max_source_tokens={self.data.max_source_tokens} is below the {needed} calibration tokens "
                "asked for (data.num_sequences x data.seq_len)"
            )
        self._validate_search()
        b = self.backend
        if b.num_workers < 1 or b.num_cpus_per_worker < 0 or b.num_gpus_per_worker < 0 or b.max_retries < 0:
            raise TyrError("backend: num_workers must be >= 1; CPU/GPU requests and max_retries must be >= 0")

    def _validate_search(self) -> None:
        se = self.search
        if se.num_iterations < 1:
            raise TyrError(f"search.num_iterations must be >= 1, got {se.num_iterations}")
        if len(se.generations) != se.num_iterations or any(g < 0 for g in se.generations):
            raise TyrError(
                f"search.generations must list {se.num_iterations} non-negative counts (one per iteration), "
                f"got {se.generations}"
            )
        if any(len(st) != 2 for st in se.stages):
            raise TyrError(f"search.stages must be a list of [survivors, tokens] pairs, got {se.stages}")
        for name in ("num_offspring", "max_mutations", "topk", "batch_size"):
            if getattr(se, name) < 1:
                raise TyrError(f"search.{name} must be >= 1, got {getattr(se, name)}")
        from tyr.methods import METHODS

        if se.method not in METHODS:
            raise TyrError(f"search.method must be one of {', '.join(METHODS)}, got {se.method!r}")
        if not METHODS[se.method].joint_budget and se.budget != "per_type":
            raise TyrError(
                f"search.method={se.method} allocates under search.budget=per_type only (it holds each module "
                "type's unit count exactly); set search.budget=per_type or use method evolution"
            )
        tokens = self.data.num_sequences * self.data.seq_len
        if se.stages and max(st[1] for st in se.stages) > tokens:
            raise TyrError(
                f"search.stages ask for up to {max(st[1] for st in se.stages)} tokens per stage but the calibration "
                f"set has {tokens} (data.num_sequences x data.seq_len); lower the stage tokens or add data"
            )


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
        raise TyrError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TyrError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TyrError(f"config file {path} is not valid YAML: {e}") from None
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
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Settings that cannot change a result (where fitness runs, how memory is placed, logging): not part of a
# run's identity, so a run may be resumed with other values. Dotted keys name one setting of a section.
IDENTITY_EXCLUDED = ("backend",)


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


def config_from_stored(stored: dict, where: str = "config.yaml") -> RunConfig:
    """The RunConfig of a stored config.yaml: keys it lacks (written before they existed) read as their
    defaults, which reproduce the older behaviour. TyrError for unknown keys or bad values."""
    try:
        return from_dict(RunConfig, stored)
    except TyrError as e:
        raise TyrError(f"{where}: {e}") from None
