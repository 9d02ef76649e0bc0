"""I/O counters of a fitness backend, recorded per generation in history.jsonl (`io`).

They make the search's data movement visible: a supernet that does not stay resident shows as variant bytes
read every generation, a file verified more than once as hashes after the first generation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class IOCounters:
    """Totals since a backend was created (or, as a difference, over one generation).

    Attributes:
        variant_bytes_read: bytes of supernet variant files read.
        num_variant_files_hashed: variant files whose sha256 was computed.
        teacher_bytes_read: bytes of teacher top-K targets read.
        num_genes_swapped: genes realised anew on a model (a gene put back to its dense form counts too).
    """

    variant_bytes_read: int = 0
    num_variant_files_hashed: int = 0
    teacher_bytes_read: int = 0
    num_genes_swapped: int = 0

    def __add__(self, other: IOCounters) -> IOCounters:
        return IOCounters(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: IOCounters) -> IOCounters:
        return IOCounters(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> IOCounters:
        return cls(**{f.name: int(d.get(f.name, 0)) for f in fields(cls)})


def io_counters(fitness: object) -> IOCounters:
    """The backend's running totals (`fitness.io_counters`), or zeros for a fitness without counters."""
    counters = getattr(fitness, "io_counters", None)
    return counters if isinstance(counters, IOCounters) else IOCounters()
