"""`tyr export`: write a pruned model as a Hugging Face folder, and `load_pruned` to read it back.

Two formats:

* ``hf`` (default): the compact model. Tensor names are the family's own (``model.layers.N.self_attn.q_proj.weight``
  ...), only their shapes shrink. When every layer keeps the same numbers of heads, KV heads and channels, each
  kept KV head serves the same number of query heads and no layer is fully pruned, the config is the family's
  stock config with smaller ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` (no remote
  code). Otherwise it is a ``tyr_<family>`` config with per-layer lists, and ``modeling_tyr.py`` (imports only torch
  and transformers) is written next to it with an ``auto_map``, so that
  ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works without tyr installed.
* ``dense-masked``: the original architecture and config; pruned heads and channels are zeroed (their q/k/v and
  gate/up rows, and their o_proj/down_proj columns) and the kept o_proj/down_proj columns hold the re-fitted
  weights. Loads with stock transformers anywhere; computes the same function as ``hf`` (up to rounding).

Both also hold the tokenizer, ``generation_config.json``, ``architecture.json`` and a model card ``README.md``.
The folder is written next to ``--out`` under a temporary name and renamed at the end, so an interrupted export
leaves nothing half-written behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tyr.errors import TyrError

if TYPE_CHECKING:  # torch and the rest load on first use: `tyr --help` stays fast
    import torch
    from torch import nn

    from tyr.supernet.families import ModelAdapter
    from tyr.supernet.variant import Variant

Format = Literal["hf", "dense-masked"]
FORMATS: tuple[str, ...] = ("hf", "dense-masked")
MODELING_FILE = "modeling_tyr.py"
ARCHITECTURE_FILE = "architecture.json"
DEFAULT_SHARD_BYTES = 2 << 30


# ----------------------------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class LayerShape:
    """What one decoder layer keeps (indices into the dense model's heads / KV heads / channels)."""

    kept_heads: tuple[int, ...]
    kept_kv_heads: tuple[int, ...]
    kv_index: tuple[int, ...]  # per kept query head: position of its KV head among kept_kv_heads
    kept_channels: tuple[int, ...]
    # A compensation bias (FLAP criterion) on an output projection that has none in the dense model.
    o_bias: bool = False
    down_bias: bool = False


def layer_shapes(adapter: ModelAdapter, variants: Sequence[Variant | None]) -> list[LayerShape]:
    """Per layer, the kept units of a genome (one Variant per gene in ``genes_of`` order; None = dense)."""
    from tyr.supernet.variant import genes_of

    genes = genes_of(adapter.num_layers)
    if len(variants) != len(genes):
        raise TyrError(
            f"genome has {len(variants)} genes but the model has {len(genes)} "
            f"({adapter.num_layers} layers x attn, mlp)"
        )
    shapes = []
    for i in range(adapter.num_layers):
        attn, mlp = variants[2 * i], variants[2 * i + 1]
        heads = _kept(attn, adapter.num_heads)
        units = adapter.units("attn")
        shapes.append(
            LayerShape(
                heads,
                tuple(units.kept_kv_heads(heads)),
                tuple(units.kv_index(heads)),
                _kept(mlp, adapter.intermediate_size),
                o_bias=_adds_bias(attn) and not adapter.o_bias,
                down_bias=_adds_bias(mlp) and not adapter.mlp_bias,
            )
        )
    return shapes


def _adds_bias(variant: Variant | None) -> bool:
    return variant is not None and variant.bias is not None


def has_added_biases(shapes: Sequence[LayerShape]) -> bool:
    return any(s.o_bias or s.down_bias for s in shapes)


def _kept(variant: Variant | None, num_units: int) -> tuple[int, ...]:
    if variant is None:
        return tuple(range(num_units))
    return tuple(int(k) for k in variant.kept.tolist())


def is_uniform(shapes: Sequence[LayerShape]) -> bool:
    """True when a stock config describes the model: same counts everywhere, even GQA groups, no empty layer."""
    if has_added_biases(shapes):  # stock configs cannot give only some output projections a bias
        return False
    first = shapes[0]
    n_q, n_kv, n_ch = len(first.kept_heads), len(first.kept_kv_heads), len(first.kept_channels)
    if n_q == 0 or n_ch == 0 or n_q % n_kv:
        return False
    group = n_q // n_kv
    even = tuple(j // group for j in range(n_q))
    return all(
        (len(s.kept_heads), len(s.kept_kv_heads), len(s.kept_channels)) == (n_q, n_kv, n_ch)
        and s.kv_index == even
        for s in shapes
    )


def compute_architecture(
    model: nn.Module,
    adapter: ModelAdapter,
    shapes: Sequence[LayerShape],
    base_model: str | None = None,
    target_sparsity: float | None = None,
) -> dict:
    """``architecture.json`` (the schema of ``tyr.pipeline.architecture``) for per-layer kept units."""
    layers, prunable_pruned = [], 0
    for i, s in enumerate(shapes):
        prunable_pruned += adapter.attention_params(s.kept_heads) + adapter.mlp_params(len(s.kept_channels))
        prunable_pruned += adapter.hidden_size * (int(s.o_bias) + int(s.down_bias))
        layers.append(
            {
                "index": i,
                "attention": {"kept_heads": list(s.kept_heads), "kept_kv_heads": list(s.kept_kv_heads)},
                "mlp": {"kept_channels_count": len(s.kept_channels), "kept_channels": list(s.kept_channels)},
            }
        )
    dense = sum(p.numel() for p in model.parameters())
    prunable_dense = adapter.dense_prunable_params()
    achieved = 1.0 - prunable_pruned / prunable_dense
    return {
        "base_model": base_model if base_model is not None else _name_or_path(model),
        "model_type": adapter.model_type,
        "target_sparsity": target_sparsity if target_sparsity is not None else achieved,
        "achieved_sparsity": achieved,
        "params": {
            "dense": dense,
            "pruned": dense - prunable_dense + prunable_pruned,
            "prunable_dense": prunable_dense,
            "prunable_pruned": prunable_pruned,
        },
        "layers": layers,
    }


def _name_or_path(model: nn.Module) -> str:
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")


def _check_architecture(architecture: dict, shapes: Sequence[LayerShape]) -> None:
    layers = architecture.get("layers") if isinstance(architecture, dict) else None
    if not isinstance(layers, list) or len(layers) != len(shapes):
        raise TyrError(
            f"architecture describes {len(layers) if isinstance(layers, list) else 'no'} layers, "
            f"the genome {len(shapes)}"
        )
    for i, (entry, s) in enumerate(zip(layers, shapes)):
        try:
            heads = tuple(entry["attention"]["kept_heads"])
            channels = tuple(entry["mlp"]["kept_channels"])
        except (KeyError, TypeError):
            raise TyrError(f"architecture layer {i} lacks attention.kept_heads / mlp.kept_channels") from None
        if heads != s.kept_heads or channels != s.kept_channels:
            raise TyrError(
                f"architecture layer {i} keeps other units than the genome's variants; "
                "the run directory is inconsistent (re-run `tyr run` to rebuild final/)"
            )


# -------------------------------------------------------------------------------------------------- config
def _base_config_dict(model: nn.Module, dtype: torch.dtype) -> dict:
    config = model.config.to_dict()
    for key in ("_name_or_path", "auto_map", "transformers_version", "_commit_hash"):
        config.pop(key, None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    return config


def pruned_config(
    model: nn.Module, adapter: ModelAdapter, shapes: Sequence[LayerShape], dtype: torch.dtype
) -> tuple[dict, bool]:
    """(config.json dict, uses remote code) of the compact model."""
    from tyr import modeling_tyr

    config = _base_config_dict(model, dtype)
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


# ------------------------------------------------------------------------------------------------- weights
def _realised_state(
    model: nn.Module, adapter: ModelAdapter, variants: Sequence[Variant | None], fmt: str, shapes
) -> dict[str, torch.Tensor]:
    """The state dict of the model with the genome realised (compact for hf, zero-masked for dense-masked).

    Must be called between ``Realiser.apply`` and ``restore_dense`` and written before the latter; tensors are
    the model's own (detached), except for the rows zeroed here, which are copies.
    """
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if fmt == "dense-masked":
        for i, s in enumerate(shapes):
            prefix = f"model.layers.{i}."
            dropped = {
                **{f"self_attn.{n}": r for n, r in adapter.units("attn").dropped_rows(s.kept_heads).items()},
                **{f"mlp.{n}": r for n, r in adapter.units("mlp").dropped_rows(s.kept_channels).items()},
            }
            for name, rows in dropped.items():
                if rows.numel() == 0:
                    continue
                for suffix in ("weight", "bias"):
                    key = f"{prefix}{name}.{suffix}"
                    if key in state:
                        state[key] = state[key].clone()
                        state[key][rows] = 0
    tied = getattr(model.config, "tie_word_embeddings", False)
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if tied and head is not None and embed is not None and head.data_ptr() == embed.data_ptr():
        del state["lm_head.weight"]
    return state


def write_weights(
    directory: Path, state: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES
):
    """``model.safetensors`` (or numbered shards plus ``model.safetensors.index.json``), names sorted."""
    from tyr.io import atomic_write_json, atomic_write_tensors

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        t = state[name]
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write_tensors(directory / "model.safetensors", shards[0], metadata=meta)
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        atomic_write_tensors(directory / fname, shard, metadata=meta)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    atomic_write_json(
        directory / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


# -------------------------------------------------------------------------------------------------- export
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
    target_sparsity: float | None = None,
    generation_config=None,
    protect: Iterable[str | os.PathLike] = (),
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Export the dense ``model`` with the genome ``variants`` (one per gene, ``genes_of`` order; None = dense).

    The model must be dense (unrealised); it is realised for the export and restored exactly afterwards.
    ``architecture`` (default: computed) is written as ``architecture.json``; ``metrics`` (a run's
    ``final/metrics.json``) goes into the model card. ``protect`` lists folders that ``force`` must never
    delete (the run, the base model). Returns the output folder.
    """
    from tyr.io import atomic_write_json, atomic_write_text
    from tyr.supernet.families import ModelAdapter
    from tyr.supernet.realise import Realiser

    if format not in FORMATS:
        raise TyrError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    adapter = ModelAdapter(model) if adapter is None else adapter
    adapter._check_layers()  # refuses an already pruned (compact) model
    out = Path(out)
    check_output_folder(out, force, protect)
    shapes = layer_shapes(adapter, variants)
    if architecture is None:
        architecture = compute_architecture(model, adapter, shapes, base_model, target_sparsity)
    else:
        _check_architecture(architecture, shapes)
    dtype = next(model.parameters()).dtype
    remote = False
    if format == "dense-masked" and has_added_biases(shapes):
        raise TyrError(
            "this genome adds compensation biases (FLAP criterion) that the original architecture cannot hold; "
            "export it with --format hf"
        )
    if format == "hf":
        config, remote = pruned_config(model, adapter, shapes, dtype)
    else:
        config = _base_config_dict(model, dtype)
        config["architectures"] = [type(model).__name__]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        realiser = Realiser(model, adapter, mode="compact" if format == "hf" else "masked")
        try:
            realiser.apply(variants)
            state = _realised_state(model, adapter, variants, format, shapes)
            write_weights(tmp, state, max_shard_bytes)
            del state
        finally:
            realiser.restore_dense()
        atomic_write_json(tmp / "config.json", config)
        if remote:
            from tyr import modeling_tyr

            shutil.copyfile(modeling_tyr.__file__, tmp / MODELING_FILE)
        _write_generation_config(tmp, model, generation_config)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / ARCHITECTURE_FILE, architecture)
        atomic_write_text(tmp / "README.md", model_card(architecture, metrics, format, remote, config))
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_generation_config(directory: Path, model: nn.Module, generation_config) -> None:
    from transformers import GenerationConfig

    from tyr.io import atomic_write_text

    gen = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if gen is None:
        gen = GenerationConfig.from_model_config(model.config)
    atomic_write_text(directory / "generation_config.json", gen.to_json_string(use_diff=True))


def check_output_folder(out: Path, force: bool, protect: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse a non-empty ``out`` unless ``force``; never one that holds (or is) a protected folder."""
    if not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    resolved = out.resolve()
    for p in protect:
        q = Path(p).resolve()
        inside = q in resolved.parents and not _is_export(out)  # e.g. RUN/final: only a former export may go
        if resolved == q or resolved in q.parents or inside:
            raise TyrError(f"--out {out} would overwrite {q}; choose another output folder")
    if not force:
        what = "folder" if out.is_dir() else "file"
        raise TyrError(f"output {what} {out} exists and is not empty; choose another --out or pass --force")


def _is_export(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / ARCHITECTURE_FILE).is_file()


def _share_modes(folder: Path) -> None:
    """Temp folders and atomically written files are private (0700/0600); give the export the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is set aside first and deleted last."""
    _share_modes(tmp)
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-")) / "x"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- model card
def model_card(architecture: dict, metrics: dict | None, fmt: str, remote: bool, config: dict) -> str:
    base = architecture.get("base_model") or "an unnamed model"
    params = architecture.get("params", {})
    layers = architecture.get("layers", [])
    n_heads = config.get("num_attention_heads")
    n_kv = config.get("num_key_value_heads")
    n_ch = config.get("intermediate_size")
    if fmt == "hf" and not remote:
        dense_heads = dense_kv = dense_ch = None
    else:
        dense_heads, dense_kv, dense_ch = n_heads, n_kv, n_ch
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- pruned",
        "- structured-pruning",
        "- tyr",
        "---",
        "",
        f"# {Path(base).name or base}, structurally pruned with Tyr",
        "",
        f"Attention heads and MLP channels of `{base}` ({architecture.get('model_type')}) were removed by Tyr "
        "(Týr-the-Pruner: a supernet of locally pruned variants per module, re-fitted output projections, and an "
        "evolutionary search for the per-layer sparsity).",
        "",
        f"- target sparsity: {_pct(architecture.get('target_sparsity'))} of the prunable parameters "
        f"(attention and MLP projections); achieved: {_pct(architecture.get('achieved_sparsity'))}",
        f"- parameters: {_count(params.get('dense'))} dense → {_count(params.get('pruned'))} pruned "
        f"(prunable: {_count(params.get('prunable_dense'))} → {_count(params.get('prunable_pruned'))})",
        f"- format: `{fmt}`"
        + (
            " — compact weights; per-layer shapes need `trust_remote_code=True` (or `tyr.load_pruned`)"
            if fmt == "hf" and remote
            else " — compact weights, stock config"
            if fmt == "hf"
            else " — original shapes, pruned weights zeroed"
        ),
        "",
    ]
    if metrics:
        lines += _metrics_section(metrics)
    lines += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    trust = ", trust_remote_code=True" if remote else ""
    lines += [
        f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{trust})',
        f'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder"{trust})',
        "```",
        "",
    ]
    if remote:
        lines += ["With tyr installed, `tyr.load_pruned(folder)` loads it without remote code.", ""]
    lines += [
        "## Per-layer structure",
        "",
        "| layer | query heads | KV heads | MLP channels |",
        "|---|---|---|---|",
    ]
    for entry in layers:
        heads = len(entry["attention"]["kept_heads"])
        kv = len(entry["attention"]["kept_kv_heads"])
        ch = entry["mlp"]["kept_channels_count"]
        lines.append(
            f"| {entry['index']} | {heads}{_of(dense_heads)} | {kv}{_of(dense_kv)} | {ch}{_of(dense_ch)} |"
        )
    lines += [
        "",
        "Exact kept head / channel indices (into the dense model) are in `architecture.json`.",
        "",
    ]
    return "\n".join(lines)


def _metrics_section(metrics: dict) -> list[str]:
    rows = []
    for name in ("dense", "uniform", "searched"):
        m = metrics.get(name)
        if isinstance(m, dict):
            rows.append(f"| {name} | {_num(m.get('ppl'))} | {_num(m.get('kl'), 4)} |")
    if not rows:
        return []
    data = metrics.get("eval_data", "held-out data")
    tokens = metrics.get("eval_tokens")
    return [
        "## Measured quality",
        "",
        f"Perplexity and top-{metrics.get('topk', 'K')} KL divergence to the dense model on `{data}`"
        + (f" ({tokens} tokens)" if tokens else "")
        + "; `uniform` prunes every layer equally, `searched` is this model.",
        "",
        "| model | perplexity | KL to dense |",
        "|---|---|---|",
        *rows,
        "",
    ]


def _of(dense) -> str:
    return f" / {dense}" if dense is not None else ""


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "?"


def _count(n) -> str:
    if not isinstance(n, int):
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


def _num(x, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "?"


# -------------------------------------------------------------------------------------------------- loading
def load_pruned(path: str | os.PathLike, *, dtype=None, device=None, **kwargs):
    """Load a folder written by ``tyr export`` (any format) without ``trust_remote_code``.

    A ``tyr_<family>`` config is served by the modeling code of the installed tyr package; stock configs by
    transformers. ``dtype`` (default: the checkpoint's) and ``device`` are optional; the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM

    from tyr import modeling_tyr

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise TyrError(f"{path} is not a model folder (no config.json)")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type", "")
    except (OSError, ValueError) as e:
        raise TyrError(f"{config_path} is unreadable: {e}") from None
    if dtype is not None:
        kwargs["dtype"] = dtype
    if isinstance(model_type, str) and model_type.startswith("tyr_"):
        family = model_type.removeprefix("tyr_")
        if family not in modeling_tyr.CLASSES:
            raise TyrError(f"{path}: unknown pruned model type {model_type!r}")
        register_auto_classes()
        model = modeling_tyr.CLASSES[family][1].from_pretrained(str(path), **kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError) as e:
            raise TyrError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    if device is not None:
        model = model.to(device)
    return model.eval()


def register_auto_classes() -> None:
    """Make the Auto classes (AutoConfig, AutoModelForCausalLM, and so AutoTokenizer) know the tyr_* types
    in this process, so that they use tyr's modeling code instead of asking about the folder's remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tyr import modeling_tyr

    for config_cls, model_cls in modeling_tyr.CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


# ----------------------------------------------------------------------------------------------- run dirs
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
    from tyr.supernet.families import adapter_for
    from tyr.supernet.store import SupernetStore
    from tyr.supernet.variant import genes_of

    cfg = final.config
    dev = resolve_device(device or cfg.model.device)
    dtype = _torch_dtype(final.dtype) or resolve_dtype(cfg.model.dtype, dev)
    resolved = resolve_model(cfg.model.name)
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
    if format not in FORMATS:
        raise TyrError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
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
        protect=protect,
    )


# ---------------------------------------------------------------------------------------------------- CLI
def cmd_export(args: argparse.Namespace) -> int:
    out = export_run(args.run, args.out, format=args.format, force=args.force)
    print(f"[tyr] exported {args.run} ({args.format}) to {out}")
    return 0


def add_export_parser(sub) -> argparse.ArgumentParser:
    """Register `tyr export RUN --out DIR [--format hf|dense-masked] [--force]`."""
    p = sub.add_parser(
        "export",
        help="write a finished run's pruned model as a Hugging Face folder",
        description="Write the final pruned model of a finished `tyr run` as a Hugging Face folder.",
    )
    p.add_argument("run", help="run directory (the --out of `tyr run`)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --force)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="hf",
        help="hf: compact weights (default); dense-masked: original shapes with pruned weights zeroed",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_export)
    return p
