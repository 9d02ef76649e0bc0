"""Where the calibration sequences' hidden states live while the supernet is built (`supernet.offload`).

The builder works on one chunk of `batch_size` sequences at a time: it takes the chunk to the compute device
(`get`), runs a module on it and writes the updated chunk back (`put`). Between genes the hidden states of all
sequences, (N, T, d), stay wherever the store keeps them:

* ``none``: on the compute device, as one tensor per chunk (the fastest; device memory grows with N).
* ``host``: one (N, T, d) tensor in host RAM, pinned when the device is a GPU so that copies are asynchronous.
* ``disk``: one (N, T, d) memory-mapped file; the pages are file-backed, so the OS can write them out instead
  of holding them in RAM (host memory stays flat in N).

Every store hands out equal values, so the supernet does not depend on the choice (tests/test_offload.py).
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import torch

OFFLOAD_MODES = ("none", "host", "disk")
HIDDEN_FILE = "hidden.bin"


class HiddenStore(ABC):
    """Hidden states of N sequences, (N, T, d), in chunks of `batch_size` sequences (the last may be shorter).

    `get(i)` returns chunk i on the compute device as a tensor the caller may update in place; `put(i, h)`
    stores it back. `device_bytes` is how much of the store sits on the compute device.
    """

    # True when the chunks live on the compute device: `get` then costs nothing, and the builder also keeps a
    # gene's projection inputs between its two passes instead of recomputing them (offload none).
    on_device = False

    def __init__(
        self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, batch_size: int
    ):
        self.shape, self.dtype, self.device, self.batch_size = shape, dtype, device, batch_size
        self.num_chunks = math.ceil(shape[0] / batch_size)

    def bounds(self, i: int) -> tuple[int, int]:
        """First and one-past-last sequence of chunk i."""
        return i * self.batch_size, min((i + 1) * self.batch_size, self.shape[0])

    @property
    def device_bytes(self) -> int:
        return 0

    @abstractmethod
    def get(self, i: int) -> torch.Tensor:
        """Chunk i, (B, T, d), on the compute device."""

    @abstractmethod
    def put(self, i: int, h: torch.Tensor) -> None:
        """Store chunk i, (B, T, d)."""

    @abstractmethod
    def close(self) -> None:
        """Release the storage (files included)."""


class DeviceHidden(HiddenStore):
    """`none`: every chunk stays on the compute device; `get` hands out the stored tensor itself."""

    on_device = True

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._chunks: list[torch.Tensor | None] = [None] * self.num_chunks

    @property
    def device_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self._chunks if c is not None)

    def get(self, i: int) -> torch.Tensor:
        return self._chunks[i]

    def put(self, i: int, h: torch.Tensor) -> None:
        self._chunks[i] = h

    def close(self) -> None:
        self._chunks = [None] * self.num_chunks


class HostHidden(HiddenStore):
    """`host`: one (N, T, d) host tensor, pinned for a GPU (asynchronous copies both ways)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._pinned = self.device.type == "cuda"
        self._buffer = torch.empty(self.shape, dtype=self.dtype, pin_memory=self._pinned)  # (N, T, d)

    def get(self, i: int) -> torch.Tensor:
        a, b = self.bounds(i)
        # copy=True also on a CPU device: the caller updates the chunk in place before `put`.
        return self._buffer[a:b].to(self.device, non_blocking=self._pinned, copy=True)

    def put(self, i: int, h: torch.Tensor) -> None:
        a, b = self.bounds(i)
        # Stream-ordered: a later `get` of this chunk is queued after the copy, and the caching allocator does
        # not hand h's memory to a kernel that could run before the copy has read it.
        self._buffer[a:b].copy_(h, non_blocking=self._pinned)

    def close(self) -> None:
        if self._pinned:
            torch.cuda.synchronize(self.device)  # no copy may still read or write the buffer being freed
        self._buffer = torch.empty(0)


class DiskHidden(HiddenStore):
    """`disk`: one (N, T, d) memory-mapped file in `directory` (created here, removed by `close`)."""

    def __init__(self, *args, directory: Path) -> None:
        super().__init__(*args)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / HIDDEN_FILE
        self.path.unlink(missing_ok=True)  # a killed build's file: its contents are never reused
        numel = math.prod(self.shape)
        mapped = torch.from_file(str(self.path), shared=True, size=numel, dtype=self.dtype)
        self._map = mapped.view(self.shape)  # (N, T, d), file-backed pages

    def get(self, i: int) -> torch.Tensor:
        a, b = self.bounds(i)
        return self._map[a:b].to(self.device, copy=True)

    def put(self, i: int, h: torch.Tensor) -> None:
        a, b = self.bounds(i)
        self._map[a:b].copy_(h)

    def close(self) -> None:
        self._map = torch.empty(0)  # unmaps the file
        self.path.unlink(missing_ok=True)
        # A folder holding other files, or a symlink the user made, stays.
        with contextlib.suppress(OSError):
            self.directory.rmdir()


@contextlib.contextmanager
def open_hidden_store(
    mode: str,
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int,
    directory: Path | None = None,
) -> Iterator[HiddenStore]:
    """A HiddenStore for offload `mode` (none | host | disk), closed (its file removed) when the block ends."""
    if mode == "none":
        store: HiddenStore = DeviceHidden(shape, dtype, device, batch_size)
    elif mode == "host":
        store = HostHidden(shape, dtype, device, batch_size)
    elif mode == "disk":
        if directory is None:
            raise ValueError("offload mode 'disk' needs a directory for its memory-mapped file")
        store = DiskHidden(shape, dtype, device, batch_size, directory=directory)
    else:
        raise ValueError(f"unknown offload mode {mode!r}; expected one of {', '.join(OFFLOAD_MODES)}")
    try:
        yield store
    finally:
        store.close()
