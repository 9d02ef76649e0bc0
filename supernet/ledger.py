"""How much memory the supernet build holds on its compute device, per gene and phase (`build.json`).

The ledger adds up the tensors the builder knows it holds (hidden-state chunks, projection inputs, H and the
input statistics, the local pruner's working set, the expected weight, the propagated output) instead of
asking the allocator, so it reads the same on every device: a CPU test can check that a streamed build's
device memory does not grow with the number of calibration sequences. Kernel temporaries and the model's
weights are not in it; on CUDA the allocator's own peak (`torch.cuda.max_memory_allocated`, reset at every
gene) is recorded beside it, and the difference between the two is what the ledger does not see.
"""

from __future__ import annotations

import torch

PHASES = ("capture", "prune", "propagate")  # pass 1 (statistics), the local pruner, pass 2 (next inputs)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class DeviceLedger:
    """Named byte counts held on `device`; tracks the peak of their sum per gene and phase.

    `hold(key, n)` sets what `key` holds (replacing the previous count), `add` grows it, `release` drops it.
    Counts held between genes (the hidden states of offload `none`) carry over to the next gene.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.genes: list[dict] = []
        self._held: dict[str, int] = {}
        self._gene: dict | None = None
        self._phase: str | None = None

    def begin_gene(self, name: str) -> None:
        """Start a gene's record; nothing is noted until its first phase begins."""
        self._gene, self._phase = {"gene": name, "peak_bytes": {}}, None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def phase(self, name: str) -> None:
        self._phase = name
        self._note()

    def hold(self, key: str, num_bytes: int) -> None:
        self._held[key] = int(num_bytes)
        self._note()

    def add(self, key: str, num_bytes: int) -> None:
        self.hold(key, self._held.get(key, 0) + num_bytes)

    def release(self, *keys: str) -> None:
        for key in keys:
            self._held.pop(key, None)

    def end_gene(self, built: bool) -> None:
        gene = self._gene
        assert gene is not None, "end_gene without begin_gene"
        gene["built"] = built
        gene["peak"] = max(gene["peak_bytes"].values(), default=0)
        gene["cuda_max_allocated"] = (
            torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        )
        self.genes.append(gene)
        self._gene = None

    def _note(self) -> None:
        if self._gene is None or self._phase is None:
            return
        peaks = self._gene["peak_bytes"]
        peaks[self._phase] = max(peaks.get(self._phase, 0), sum(self._held.values()))

    def summary(self) -> dict:
        """JSON-ready: the device, the overall and per-phase peaks, and every gene's record."""
        by_phase = {
            phase: max((g["peak_bytes"].get(phase, 0) for g in self.genes), default=0) for phase in PHASES
        }
        allocated = [g["cuda_max_allocated"] for g in self.genes if g["cuda_max_allocated"] is not None]
        return {
            "device": str(self.device),
            "peak_bytes": max((g["peak"] for g in self.genes), default=0),
            "peak_bytes_by_phase": by_phase,
            "cuda_max_allocated": max(allocated) if allocated else None,
            "genes": self.genes,
        }
