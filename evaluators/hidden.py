"""Hidden-state terms of the fitness (Týr-the-Pruner's Eq. 6): the dense teacher's decoder-block outputs at a few
layers, stored once, and the candidate's relative squared error against them.

With `search.fitness: kl+hidden` a candidate's per-sequence fitness sum is its KL sum plus `hidden_weight` times
its hidden-state error sum: for each scored position, the mean over the chosen layers of
``||h_candidate - h_teacher||^2 / (D * scale_l)``, where ``scale_l`` is the teacher's mean squared activation at
layer l over the whole calibration set (so every layer contributes on the same scale, whatever its norm). The
term is reduced exactly like the KL (per sequence, float64, in sequence order), so the fitness stays the same
bits on any split of the work.

Layout of a teacher-hidden directory (next to the top-K targets):

* ``hidden.safetensors`` -- ``hidden`` bfloat16 (N, T, L, D): the outputs of decoder blocks ``layers`` (L of
  them) for every calibration position; bfloat16 keeps the range of large activations (a relative rounding of
  ~0.4%, far below the errors being measured).
* ``meta.json`` -- written last: format, layers, shape, per-layer scales, the file's digest
  (`tyr.io.blocked_sha256_file`) and the tokens' sha256.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyr.errors import TyrError
from tyr.evaluators.kl import base_and_head, check_tokens, hidden_states, iter_batches, model_device
from tyr.io import StreamingTensorFile, atomic_write_json, file_digest_matches, sha256_tensor

FORMAT = "tyr-teacher-hidden"
FORMAT_VERSION = 1
HIDDEN_FILE = "hidden.safetensors"
META_FILE = "meta.json"
HIDDEN_DTYPE = torch.bfloat16


def hidden_layers(num_layers: int) -> list[int]:
    """The decoder blocks whose outputs the fitness compares: the first, the middle and the last."""
    return sorted({0, num_layers // 2, num_layers - 1})


def hidden_bytes(num_tokens: int, hidden_size: int, num_layers: int) -> int:
    """Disk bytes of the stored teacher hidden states of `num_tokens` calibration tokens."""
    return (
        num_tokens
        * len(hidden_layers(num_layers))
        * hidden_size
        * torch.empty((), dtype=HIDDEN_DTYPE).element_size()
    )


@contextlib.contextmanager
def capturing(layers: Sequence[nn.Module]) -> Iterator[list]:
    """During the block inside, the last output of each module in `layers` (forward hooks; a decoder block that
    returns a tuple gives its first element, the hidden states)."""
    outputs: list = [None] * len(layers)

    def hook(i: int):
        def keep(module, args, output):
            outputs[i] = output[0] if isinstance(output, tuple) else output

        return keep

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def compute_and_save_teacher_hidden(
    model: nn.Module,
    layers: Sequence[nn.Module],
    layer_indices: Sequence[int],
    tokens: torch.Tensor,
    directory: str | os.PathLike,
    batch_size: int = 4,
    progress: bool = False,
) -> TeacherHidden:
    """Run the dense model over `tokens` (N, T) batch by batch and stream the outputs of `layers` (the decoder
    blocks `layer_indices`) into `directory`; returns the opened store. Memory holds one batch."""
    tokens = check_tokens(tokens)
    n, t = tokens.shape
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)  # never describe a half-written file
    d = _hidden_size(model)
    writer = StreamingTensorFile(
        directory / HIDDEN_FILE,
        {"hidden": (HIDDEN_DTYPE, (n, t, len(layers), d))},
        metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)},
    )
    squares = torch.zeros(len(layers), dtype=torch.float64)  # sum of squared activations per layer
    device = model_device(model)
    base = base_and_head(model)[0]  # the decoder blocks only: no vocabulary projection
    try:
        for s, e in iter_batches(n, batch_size, progress, "teacher hidden states"):
            with torch.inference_mode(), capturing(layers) as outputs:
                hidden_states(base, tokens[s:e].to(device))
            rows = torch.stack([o.to("cpu", torch.float32) for o in outputs], dim=2)  # (B, T, L, D)
            squares += rows.double().pow(2).sum(dim=(0, 1, 3))
            writer.write_rows("hidden", s, rows.to(HIDDEN_DTYPE))
        file_sha = writer.commit()
    except BaseException:
        writer.abort()
        raise
    scales = (squares / (n * t * d)).tolist()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layers": [int(i) for i in layer_indices],
        "shape": [n, t, len(layers), d],
        "dtype": "bfloat16",
        "scales": scales,
        "tokens_sha256": sha256_tensor(tokens),
        "hidden_sha256": file_sha,
    }
    atomic_write_json(directory / META_FILE, meta)
    return TeacherHidden.open(directory)


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    if size is None:
        size = model.get_input_embeddings().weight.shape[1]
    return int(size)


class TeacherHidden:
    """Read access to stored teacher hidden states; `get` reads only the requested rows (memory-mapped)."""

    def __init__(self, directory: Path, meta: dict[str, Any], handle):
        self.directory = directory
        self.meta = meta
        self._handle = handle
        self.num_sequences, self.seq_len, _, self.hidden_size = (int(x) for x in meta["shape"])
        self.layers: list[int] = [int(i) for i in meta["layers"]]
        self.scales: list[float] = [float(x) for x in meta["scales"]]
        self.bytes_read = 0

    @classmethod
    def open(cls, directory: str | os.PathLike, verify: bool = False) -> TeacherHidden:
        """Open and validate; `verify=True` also checks the file's sha256."""
        from safetensors import safe_open

        directory = Path(directory)
        hint = f"delete {directory} and re-run the same command to recompute the teacher hidden states"
        meta_path, file_path = directory / META_FILE, directory / HIDDEN_FILE
        if not meta_path.is_file() or not file_path.is_file():
            raise TyrError(f"{directory} holds no complete teacher hidden states; {hint}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            shape = [int(x) for x in meta["shape"]]
            layers, scales = list(meta["layers"]), [float(x) for x in meta["scales"]]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise TyrError(f"{meta_path} is unreadable or corrupt ({exc}); {hint}") from exc
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise TyrError(f"{meta_path} does not describe teacher hidden states of this version; {hint}")
        if (
            len(shape) != 4
            or len(layers) != shape[2]
            or len(scales) != shape[2]
            or min(scales, default=0) <= 0
        ):
            raise TyrError(f"{meta_path} has inconsistent shape/layers/scales; {hint}")
        try:
            handle = safe_open(str(file_path), framework="pt", device="cpu")
            sl = handle.get_slice("hidden")
            got_shape, got_dtype = list(sl.get_shape()), sl.get_dtype()
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
            raise TyrError(f"{file_path} is truncated or corrupt ({exc}); {hint}") from exc
        if got_shape != shape or got_dtype != "BF16":
            raise TyrError(f"{file_path} holds {got_dtype}{got_shape}, meta.json says BF16{shape}; {hint}")
        if verify and not file_digest_matches(file_path, str(meta.get("hidden_sha256"))):
            raise TyrError(f"{file_path} does not match the sha256 recorded in {meta_path}; {hint}")
        return cls(directory, meta, handle)

    def get(self, sequence_indices: Sequence[int], num_positions: int) -> torch.Tensor:
        """bfloat16 (len, P, L, D): the first P positions of the given rows, in the given order."""
        rows = [int(i) for i in sequence_indices]
        if any(not 0 <= i < self.num_sequences for i in rows):
            raise IndexError(f"sequence indices {rows} out of range [0, {self.num_sequences})")
        sl = self._handle.get_slice("hidden")
        out = torch.cat([sl[i : i + 1, :num_positions] for i in rows]) if rows else torch.empty(0)
        self.bytes_read += out.numel() * out.element_size()
        return out

    def close(self) -> None:
        self._handle = None


def hidden_sums(
    outputs: Sequence[torch.Tensor], teacher: torch.Tensor, scales: Sequence[float]
) -> torch.Tensor:
    """Per-sequence sums over positions of the relative hidden-state error, averaged over layers: (B,) float64.

    outputs: each chosen layer's output (B, P, D) of one forward; teacher: (B, P, L, D) stored rows.
    """
    total = None
    for i, (output, scale) in enumerate(zip(outputs, scales, strict=True)):
        target = teacher[:, :, i].to(output.device, torch.float32)
        error = (output.float() - target).pow(2).sum(dim=(1, 2)).double() / (output.shape[-1] * scale)
        total = error if total is None else total + error.to(total.device)
    return total.cpu() / len(scales)
