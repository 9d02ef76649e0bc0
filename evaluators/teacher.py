"""Dense-teacher top-K targets: computed once, stored as safetensors, read back row by row (memory-mapped).

Layout of a targets directory:

* ``targets.safetensors`` -- ``values`` float16 (N, T, K): raw teacher logits of the top-K token ids,
  descending; ``indices`` int32 (N, T, K): those token ids.
* ``meta.json`` -- written last (its presence marks a complete directory): format version, k, shape,
  dtypes, the targets file's digest (`tyr.io.blocked_sha256_file`; a plain sha256 in runs of earlier
  releases), plus whatever the caller adds (e.g. ``tokens_sha256``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tyr.errors import TyrError
from tyr.evaluators.kl import (
    DEFAULT_LOGIT_BUDGET,
    base_and_head,
    check_tokens,
    head_input,
    hidden_states,
    iter_batches,
    model_device,
)
from tyr.io import (
    StreamingTensorFile,
    atomic_write_json,
    atomic_write_tensors,
    blocked_sha256_file,
    file_digest_matches,
    sha256_tensor,
    write_rows_into,
)

FORMAT = "tyr-teacher-targets"
FORMAT_VERSION = 1
TARGETS_FILE = "targets.safetensors"
META_FILE = "meta.json"
VALUES_DTYPE = torch.float16
INDICES_DTYPE = torch.int32
_ST_DTYPES = {"values": "F16", "indices": "I32"}


# -------------------------------------------------------------------------------------------- compute
def _topk_batch(base, head, ids: torch.Tensor, k: int, logit_budget: int):
    h = head_input(hidden_states(base, ids), head)  # (B, T, D) on the head's device
    b, t, d = h.shape
    h = h.reshape(b * t, d)
    vocab = int(head.weight.shape[0])
    chunk = max(1, logit_budget // vocab)
    vals = torch.empty((b * t, k), dtype=VALUES_DTYPE, device=h.device)
    idxs = torch.empty((b * t, k), dtype=INDICES_DTYPE, device=h.device)
    for s in range(0, b * t, chunk):
        e = min(s + chunk, b * t)
        logits = head(h[s:e])
        v, i = torch.topk(logits.float(), k, dim=-1, largest=True, sorted=True)
        vals[s:e] = v.to(VALUES_DTYPE)
        idxs[s:e] = i.to(INDICES_DTYPE)
    return vals.reshape(b, t, k), idxs.reshape(b, t, k)


def _check_k(k: int, vocab: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise TyrError(f"teacher top-k must be a positive integer, got {k!r}")
    if k > vocab:
        raise TyrError(
            f"teacher top-k = {k} exceeds the model's vocabulary size {vocab}; choose k <= {vocab}"
        )


def compute_teacher_targets(
    model,
    tokens: torch.Tensor,
    k: int,
    batch_size: int = 4,
    progress: bool = False,
    logit_budget: int = DEFAULT_LOGIT_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K teacher logits for every position of `tokens` (N, T).

    Returns (values float16 (N, T, K), descending raw logits; indices int32 (N, T, K)), on the CPU.
    Runs batch by batch on the model's device; the vocabulary projection is split by position so
    one logit block stays under `logit_budget` elements.  Results are held in memory: N*T*K*6 bytes.
    """
    n, t = check_tokens(tokens).shape
    # Allocated outside inference mode so callers get ordinary (mutable) tensors.
    values = torch.empty((n, t, k), dtype=VALUES_DTYPE)
    indices = torch.empty((n, t, k), dtype=INDICES_DTYPE)
    for s, e, v, i in _iter_topk(model, tokens, k, batch_size, progress, logit_budget):
        values[s:e] = v
        indices[s:e] = i
    return values, indices


def _iter_topk(model, tokens: torch.Tensor, k: int, batch_size: int, progress: bool, logit_budget: int):
    """Validate, then yield ``(start, end, values, indices)`` per batch of sequences, on the CPU."""
    base, head = base_and_head(model)
    _check_k(k, int(head.weight.shape[0]))
    tokens = check_tokens(tokens, int(head.weight.shape[0]))
    device = model_device(model)
    for s, e in iter_batches(tokens.shape[0], batch_size, progress, "teacher top-k"):
        with torch.inference_mode():
            v, i = _topk_batch(base, head, tokens[s:e].to(device), k, logit_budget)
        yield s, e, v.cpu(), i.cpu()


# ----------------------------------------------------------------------------------------------- save
def save_teacher_targets(
    directory: str | os.PathLike,
    values: torch.Tensor,
    indices: torch.Tensor,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write `directory/targets.safetensors` then `directory/meta.json`, both atomically.

    `meta` is caller metadata (JSON-serialisable; should include ``tokens_sha256``); the format fields
    (k, shape, dtypes, file sha256) are added here and win over caller keys of the same name.
    Values are stored as float16 and indices as int32 whatever dtype they arrive in.
    """
    if values.dim() != 3 or values.shape != indices.shape:
        raise TyrError(
            f"teacher values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be (N, T, K)"
        )
    if not values.dtype.is_floating_point:
        raise TyrError(f"teacher values must be floating point, got {values.dtype}")
    if indices.dtype.is_floating_point:
        raise TyrError(f"teacher indices must be integers, got {indices.dtype}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n, t, k = values.shape
    # A stale meta.json must never describe a new, half-written targets file.
    (directory / META_FILE).unlink(missing_ok=True)
    atomic_write_tensors(
        directory / TARGETS_FILE,
        {"values": values.to(VALUES_DTYPE), "indices": indices.to(INDICES_DTYPE)},
        metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)},
    )
    # the streamed writer's digest, so both ways of writing give the same meta.json
    _write_meta(directory, dict(meta or {}), n, t, k, blocked_sha256_file(directory / TARGETS_FILE))


def _write_meta(directory: Path, meta: dict[str, Any], n: int, t: int, k: int, file_sha: str) -> None:
    """meta.json (written last: its presence marks a complete directory); format fields win over caller keys."""
    meta.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        k=k,
        num_sequences=n,
        seq_len=t,
        shape=[n, t, k],
        values_dtype="float16",
        indices_dtype="int32",
        targets_sha256=file_sha,
    )
    try:
        atomic_write_json(directory / META_FILE, meta)
    except TypeError as exc:
        raise TyrError(f"teacher-target metadata must be JSON-serialisable: {exc}") from exc


def compute_and_save_teacher_targets(
    model,
    tokens: torch.Tensor,
    k: int,
    directory: str | os.PathLike,
    batch_size: int = 4,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
    logit_budget: int = DEFAULT_LOGIT_BUDGET,
    fill: Callable[[dict, list[tuple[int, int]]], None] | None = None,
) -> TeacherTargets:
    """Compute top-K targets batch by batch, streaming each batch into `directory`; returns the opened targets.

    Memory holds one batch of targets, never the whole N*T*K*6 bytes (206 GB at the paper's setting): the file
    is written in place in a temporary file and renamed when complete, then meta.json is written. The bytes
    equal those of :func:`save_teacher_targets` for the same targets. ``tokens_sha256`` is added to the
    metadata (unless the caller supplied one) so readers can check their tokens.

    `fill(layout, blocks)`: other processes compute the rows instead (data-parallel teacher on Ray workers):
    each block [start, stop) of `batch_size` sequences goes through `write_teacher_rows` into the temporary file
    described by `layout`; the blocks are the ones this process would compute, so the bytes are the same.
    """
    vocab = int(base_and_head(model)[1].weight.shape[0])
    _check_k(k, vocab)  # before anything is written
    tokens = check_tokens(tokens, vocab)
    n, t = tokens.shape
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)  # never describe a half-written targets file
    writer = StreamingTensorFile(
        directory / TARGETS_FILE,
        {"values": (VALUES_DTYPE, (n, t, k)), "indices": (INDICES_DTYPE, (n, t, k))},
        metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)},
    )
    try:
        if fill is None:
            for s, _, v, i in _iter_topk(model, tokens, k, batch_size, progress, logit_budget):
                writer.write_rows("values", s, v)
                writer.write_rows("indices", s, i)
        else:
            fill(writer.layout(), list(iter_batches(n, batch_size, False, "")))
        file_sha = writer.commit()
    except BaseException:
        writer.abort()
        raise
    full_meta = dict(meta or {})
    full_meta.setdefault("tokens_sha256", sha256_tensor(tokens))
    full_meta.setdefault("vocab_size", vocab)
    _write_meta(directory, full_meta, n, t, k, file_sha)
    return TeacherTargets.open(directory)


def write_teacher_rows(
    model,
    tokens: torch.Tensor,
    k: int,
    layout: dict,
    start: int,
    stop: int,
    logit_budget: int = DEFAULT_LOGIT_BUDGET,
) -> None:
    """Rows [start, stop) of the top-K targets of `tokens`, computed here in one forward and written into the
    targets file another process is filling (`layout`; see `compute_and_save_teacher_targets(fill=...)`)."""
    for _, _, v, i in _iter_topk(model, tokens[start:stop], k, stop - start, False, logit_budget):
        write_rows_into(layout, "values", start, v)
        write_rows_into(layout, "indices", start, i)


# ----------------------------------------------------------------------------------------------- read
class TeacherTargets:
    """Read access to a stored targets directory; `get` reads only the requested rows (memory-mapped)."""

    def __init__(
        self, directory: Path, meta: dict[str, Any], handle, num_sequences: int, seq_len: int, k: int
    ):
        self.directory = directory
        self.meta = meta
        self._handle = handle
        self.num_sequences = num_sequences
        self.seq_len = seq_len
        self.k = k
        self.bytes_read = 0  # bytes of targets returned by `get` (I/O accounting)

    @classmethod
    def open(cls, directory: str | os.PathLike, verify: bool = False) -> TeacherTargets:
        """Open and validate; `verify=True` also checks the file's sha256 (reads the whole file)."""
        from safetensors import safe_open

        directory = Path(directory)
        hint = "recompute the teacher targets"
        if not directory.is_dir():
            raise TyrError(f"teacher-target directory {directory} does not exist; {hint}")
        meta_path, file_path = directory / META_FILE, directory / TARGETS_FILE
        if not meta_path.is_file():
            raise TyrError(f"{meta_path} is missing (incomplete or not a teacher-target directory); {hint}")
        if not file_path.is_file():
            raise TyrError(f"{file_path} is missing; {hint}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TyrError(f"{meta_path} is unreadable or corrupt ({exc}); {hint}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise TyrError(f"{meta_path} does not describe teacher targets; {hint}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise TyrError(
                f"{meta_path} has format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}; {hint}"
            )
        try:
            n, t, k = (int(x) for x in meta["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TyrError(f"{meta_path} has no valid 'shape' entry; {hint}") from exc
        try:
            handle = safe_open(str(file_path), framework="pt", device="cpu")
            keys = set(handle.keys())
        except Exception as exc:  # safetensors raises its own error type for truncated/corrupt headers
            raise TyrError(f"{file_path} is truncated or corrupt ({exc}); {hint}") from exc
        if keys != {"values", "indices"}:
            raise TyrError(
                f"{file_path} holds tensors {sorted(keys)}, expected ['indices', 'values']; {hint}"
            )
        for name, dtype in _ST_DTYPES.items():
            sl = handle.get_slice(name)
            shape, got = tuple(sl.get_shape()), sl.get_dtype()
            if shape != (n, t, k) or got != dtype:
                raise TyrError(
                    f"{file_path}: tensor '{name}' is {got}{list(shape)}, meta.json says {dtype}{[n, t, k]}; {hint}"
                )
        if (
            verify
            and meta.get("targets_sha256")
            and not file_digest_matches(file_path, meta["targets_sha256"])
        ):
            raise TyrError(
                f"{file_path} does not match the sha256 recorded in {meta_path} (the file changed after it was "
                f"written); delete {directory} and re-run the same command to recompute the targets"
            )
        return cls(directory, meta, handle, n, t, k)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Raise TyrError unless `tokens` are the ones these targets were computed on (when recorded)."""
        if tuple(tokens.shape) != (self.num_sequences, self.seq_len):
            raise TyrError(
                f"tokens {tuple(tokens.shape)} do not match the teacher targets in {self.directory} "
                f"({self.num_sequences}, {self.seq_len}); recompute the teacher targets"
            )
        want = self.meta.get("tokens_sha256")
        if want and sha256_tensor(tokens.long()) != want:
            raise TyrError(
                f"the calibration tokens differ from those the teacher targets in {self.directory} were "
                "computed on; recompute the teacher targets"
            )

    def get(
        self, sequence_indices: Sequence[int], num_positions: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(values float16 (len, P, K), indices int32 (len, P, K)) for the given rows, in the given order.

        P = `num_positions` (the first P positions of each row; default all T). Consecutive ascending runs are
        read as one slice each; nothing else of the file is loaded.
        """
        rows = [int(i) for i in sequence_indices]
        for i in rows:
            if not 0 <= i < self.num_sequences:
                raise IndexError(f"sequence index {i} out of range [0, {self.num_sequences})")
        p = self.seq_len if num_positions is None else int(num_positions)
        if not 1 <= p <= self.seq_len:
            raise IndexError(f"num_positions {p} out of range [1, {self.seq_len}]")
        if not rows:
            return (
                torch.empty((0, p, self.k), dtype=VALUES_DTYPE),
                torch.empty((0, p, self.k), dtype=INDICES_DTYPE),
            )
        runs: list[tuple[int, int]] = []
        start = prev = rows[0]
        for i in rows[1:]:
            if i == prev + 1:
                prev = i
                continue
            runs.append((start, prev + 1))
            start = prev = i
        runs.append((start, prev + 1))
        out = []
        for name in ("values", "indices"):
            sl = self._handle.get_slice(name)
            parts = [sl[a:b] if p == self.seq_len else sl[a:b, :p] for a, b in runs]
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=0))
        self.bytes_read += sum(t.numel() * t.element_size() for t in out)
        return out[0], out[1]

    def close(self) -> None:
        self._handle = None

    def __enter__(self) -> TeacherTargets:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_sequences

    def __repr__(self) -> str:
        return (
            f"TeacherTargets({str(self.directory)!r}, N={self.num_sequences}, T={self.seq_len}, K={self.k})"
        )


class StackedTargets:
    """Two targets read as one: rows [0, n1) from `first`, rows [n1, n1 + n2) from `second` (same T and K).

    Lets one fitness backend score batches of either row set (calibration and validation windows, each with
    its own targets directory) through the unchanged `get` interface.
    """

    def __init__(self, first: TeacherTargets, second: TeacherTargets):
        if (first.seq_len, first.k) != (second.seq_len, second.k):
            raise TyrError(
                f"teacher targets {first.directory} (T={first.seq_len}, K={first.k}) and {second.directory} "
                f"(T={second.seq_len}, K={second.k}) cannot be stacked: recompute them with the same settings"
            )
        self.first, self.second = first, second
        self.num_sequences = first.num_sequences + second.num_sequences
        self.seq_len = first.seq_len
        self.k = first.k
        self.meta = first.meta

    @property
    def bytes_read(self) -> int:
        return self.first.bytes_read + self.second.bytes_read

    def get(
        self, sequence_indices: Sequence[int], num_positions: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `TeacherTargets.get`, over the stacked rows, in the given order."""
        rows = [int(i) for i in sequence_indices]
        for i in rows:
            if not 0 <= i < self.num_sequences:
                raise IndexError(f"sequence index {i} out of range [0, {self.num_sequences})")
        n1 = self.first.num_sequences
        low = [i for i in rows if i < n1]
        high = [i - n1 for i in rows if i >= n1]
        if not high:
            return self.first.get(low, num_positions)
        if not low:
            return self.second.get(high, num_positions)
        parts = [self.first.get(low, num_positions), self.second.get(high, num_positions)]
        # rows came out grouped (low ones first): put them back in the order asked for
        position = {row: n for n, row in enumerate([*low, *(i + n1 for i in high)])}
        order = torch.tensor([position[i] for i in rows])
        return tuple(torch.cat([p[j] for p in parts])[order] for j in range(2))

    def close(self) -> None:
        self.first.close()
        self.second.close()

    def __len__(self) -> int:
        return self.num_sequences
