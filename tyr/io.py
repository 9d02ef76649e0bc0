"""Atomic file writes and hashing: every file a resume depends on goes through here."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise to the safetensors format with a deterministic header (sorted keys).

    The `safetensors` package writes its JSON header from a hash map, so the same tensors can give different
    bytes; resume checks compare files byte for byte, so we lay the (simple, documented) format out ourselves.
    """
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    header, _ = safetensors_header({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, metadata)
    blobs = [
        tensors[n].view(torch.uint8).numpy().tobytes() if tensors[n].numel() else b"" for n in sorted(tensors)
    ]
    return header + b"".join(blobs)


def safetensors_header(
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, int]]:
    """(length-prefixed padded header, byte offset of each tensor's data in the file) for sorted tensors."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offsets, offset = {}, 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"unsupported dtype {dtype} for {name}")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offsets[name] = offset
        offset += size
    text = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    prefix = len(text).to_bytes(8, "little") + text
    return prefix, {name: len(prefix) + off for name, off in offsets.items()}


class StreamingTensorFile:
    """A safetensors file written piecewise (rows of its tensors in any order), then committed atomically.

    For outputs larger than memory (teacher targets at paper scale): the file is laid out up front in a
    temporary file next to `path`; `commit` fsyncs and renames it and returns its digest (`blocked_sha256_file`,
    all cores). The bytes equal what `atomic_write_tensors` would write for the same tensors.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._specs = dict(specs)
        header, self._offsets = safetensors_header(self._specs, metadata)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.chmod(self._tmp, 0o666 & ~_UMASK)
        self._file = os.fdopen(fd, "w+b")
        self._file.write(header)
        total = sum(
            math.prod(shape) * torch.empty((), dtype=dt).element_size() for dt, shape in specs.values()
        )
        self._file.truncate(len(header) + total)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write `rows` as rows start, start+1, ... (along dim 0) of tensor `name`."""
        dtype, shape = self._specs[name]
        if (
            rows.dtype != dtype
            or tuple(rows.shape[1:]) != tuple(shape[1:])
            or start + rows.shape[0] > shape[0]
        ):
            raise ValueError(
                f"rows {rows.dtype}{list(rows.shape)} at {start} do not fit {name} {dtype}{list(shape)}"
            )
        row_bytes = math.prod(shape[1:]) * rows.element_size()
        self._file.seek(self._offsets[name] + start * row_bytes)
        self._file.write(rows.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())

    def layout(self) -> dict:
        """Where each tensor's rows go in the temporary file, for writers in other processes
        (`write_rows_into`): {"path": ..., "tensors": {name: [offset, row bytes, dtype, shape]}}."""
        self._file.flush()
        tensors = {}
        for name, (dtype, shape) in self._specs.items():
            row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
            tensors[name] = [self._offsets[name], row_bytes, str(dtype).removeprefix("torch."), list(shape)]
        return {"path": self._tmp, "tensors": tensors}

    def commit(self) -> str:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        _fsync_dir(self.path.parent)
        return blocked_sha256_file(self.path)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        Path(self._tmp).unlink(missing_ok=True)


def write_rows_into(layout: dict, name: str, start: int, rows: torch.Tensor) -> None:
    """Write `rows` as rows start, start+1, ... of tensor `name` of a `StreamingTensorFile` another process is
    filling (its `layout()`): a Ray worker's share of the teacher targets. The file must be on storage this process
    sees (shared by every node); the writes are synced before returning, so the owner's commit sees them."""
    offset, row_bytes, dtype, shape = layout["tensors"][name]
    if (
        str(rows.dtype).removeprefix("torch.") != dtype
        or list(rows.shape[1:]) != shape[1:]
        or start + rows.shape[0] > shape[0]
    ):
        raise ValueError(f"rows {rows.dtype}{list(rows.shape)} at {start} do not fit {name} {dtype}{shape}")
    data = rows.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    fd = os.open(layout["path"], os.O_WRONLY)
    try:
        written = os.pwrite(fd, data, offset + start * row_bytes)
        if written != len(data):
            raise OSError(f"short write to {layout['path']}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform/filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> str:
    """Write tensors as safetensors atomically; returns the sha256 of the written bytes."""
    data = safetensors_bytes(tensors, metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync (history logs; a torn last line is ignored by readers)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


BLOCK_DIGEST_BYTES = 1 << 28  # 256 MiB blocks for `blocked_sha256_file`
_BLOCKED = "sha256-blocks-"


def blocked_sha256_file(
    path: str | os.PathLike, block_bytes: int = BLOCK_DIGEST_BYTES, threads: int | None = None
) -> str:
    """A file digest computed by all cores: the sha256 of each `block_bytes` block (threads in parallel: file
    reads and hashlib release the GIL), then the sha256 of the blocks' digests in order, written
    ``sha256-blocks-<block_bytes>:<hex>``. Any changed, added or removed byte changes it, as with `sha256_file`;
    a 192 GiB teacher-targets file is read at the disk's speed rather than one core's hashing speed."""
    size = os.path.getsize(path)
    starts = range(0, max(size, 1), block_bytes)  # an empty file: one empty block

    def block_digest(start: int) -> bytes:
        h = hashlib.sha256()
        buffer = memoryview(bytearray(1 << 20))  # reused: 1 MiB reads stay in the core's cache while hashed
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            remaining = min(block_bytes, size - start)
            while remaining > 0 and (n := f.readinto(buffer[: min(len(buffer), remaining)])):
                h.update(buffer[:n])
                remaining -= n
        return h.digest()

    workers = max(1, min(len(starts), threads or os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(block_digest, starts))
    return f"{_BLOCKED}{block_bytes}:{hashlib.sha256(b''.join(digests)).hexdigest()}"


def file_digest_matches(path: str | os.PathLike, recorded: str) -> bool:
    """Whether `path` has the digest `recorded`: a `blocked_sha256_file` one, or a plain sha256 (files written by
    earlier releases)."""
    if recorded.startswith(_BLOCKED):
        block_bytes = int(recorded[len(_BLOCKED) :].split(":", 1)[0])
        return blocked_sha256_file(path, block_bytes) == recorded
    return sha256_file(path) == recorded


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
