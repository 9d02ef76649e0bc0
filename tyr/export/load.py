"""Loading an export in a process that has tyr: ``load_pruned`` (no ``trust_remote_code`` needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tyr.errors import TyrError


def load_pruned(path: str | os.PathLike, *, dtype=None, device=None, **kwargs):
    """Load a folder written by ``tyr export`` (any format) without ``trust_remote_code``.

    A ``tyr_<family>`` config is served by the modeling code of the installed tyr package; stock configs by
    transformers. ``dtype`` (default: the checkpoint's) and ``device`` are optional; other keyword arguments
    (e.g. ``attn_implementation``) go to ``from_pretrained``. The model is in eval mode.
    """
    from transformers import AutoModelForCausalLM

    from tyr import modeling_tyr
    from tyr.models import refuse_pickled_weights

    path = Path(path)
    model_type = _model_type(path)
    refuse_pickled_weights(path)
    kwargs.setdefault("use_safetensors", True)  # never unpickle a checkpoint
    if dtype is not None:
        kwargs["dtype"] = dtype
    model_cls = AutoModelForCausalLM
    if model_type.startswith("tyr_"):
        family = model_type.removeprefix("tyr_")
        if family not in modeling_tyr.CLASSES:
            raise TyrError(f"{path}: unknown pruned model type {model_type!r}")
        register_auto_classes()
        model_cls = modeling_tyr.CLASSES[family][1]
    try:
        model = model_cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, RuntimeError) as e:  # missing files, malformed per-layer config, bad shapes
        raise TyrError(f"cannot load {path}: {str(e).strip().splitlines()[0]}") from None
    if device is not None:
        model = model.to(device)
    return model.eval()


def _model_type(path: Path) -> str:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise TyrError(f"{path} is not a model folder (no config.json)")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type", "")
    except (OSError, ValueError, AttributeError) as e:
        raise TyrError(f"{config_path} is unreadable: {e}") from None
    return model_type if isinstance(model_type, str) else ""


def register_auto_classes() -> None:
    """Make the Auto classes (AutoConfig, AutoModelForCausalLM, and so AutoTokenizer) know the tyr_* types
    in this process, so that they use tyr's modeling code instead of asking about the folder's remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tyr import modeling_tyr

    for config_cls, model_cls in modeling_tyr.CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
