"""Scheduling one fitness call's candidates over several workers (the backend-independent part).

A distributed backend (Ray, in `tyr.cluster`) owns the workers; this module decides what each of them does.
Workers pull work: a free worker takes the pending candidates closest (fewest differing genes) to the genome
it will have applied, so it swaps few genes, in chunks that shrink as the queue empties, so no worker idles
while work is left. Duplicate genomes are evaluated once. Fitness depends only on (genome, sequence indices),
so results do not depend on the number of workers, the assignment or the completion order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tyr.errors import TyrError
from tyr.search.space import Genome


def genome_distance(a: Genome | None, b: Genome) -> int:
    """Genes that differ between `a` and `b`; an unknown genome (None) is farther than any known one."""
    if a is None:
        return len(b) + 1
    return sum(x != y for x, y in zip(a, b))


class WorkQueue:
    """The candidates of one fitness call: what is pending, how often each was tried, and the results.

    Args:
        genomes: the call's candidates (duplicates allowed; each unique genome is evaluated once).
        max_attempts: how many times one candidate may be handed out (it is re-queued when its worker dies);
            beyond that the candidate itself is assumed to crash workers and TyrError is raised.
    """

    def __init__(self, genomes: Sequence[Genome], max_attempts: int):
        self.genomes = [tuple(int(v) for v in g) for g in genomes]
        self.unique: list[Genome] = list(dict.fromkeys(self.genomes))
        self.pending: list[int] = list(range(len(self.unique)))
        self.attempts = [0] * len(self.unique)
        self.max_attempts = max_attempts
        self._results: list[float | None] = [None] * len(self.unique)

    def take_chunk(self, tail: Genome | None, num_workers: int, depth: int) -> list[int]:
        """Remove and return the next chunk for a worker whose model will hold `tail`.

        A nearest-neighbour chain from `tail`; its size is pending / (depth x workers), so big chunks save
        round trips early and single candidates balance the end.
        """
        size = max(1, math.ceil(len(self.pending) / (depth * max(num_workers, 1))))
        chunk: list[int] = []
        here = tail
        for _ in range(min(size, len(self.pending))):
            best = min(self.pending, key=lambda c: (genome_distance(here, self.unique[c]), c))
            self.pending.remove(best)
            chunk.append(best)
            here = self.unique[best]
        return chunk

    def requeue(self, chunk: Sequence[int]) -> None:
        """Put a dead worker's chunk back; TyrError when a candidate has crashed workers too often."""
        for c in chunk:
            self.attempts[c] += 1
            if self.attempts[c] > self.max_attempts:
                raise TyrError(
                    f"evaluating genome {list(self.unique[c])} crashed a worker {self.attempts[c]} times"
                )
        self.pending.extend(chunk)
        self.pending.sort()

    def complete(self, chunk: Sequence[int], values: Sequence[float]) -> None:
        for c, value in zip(chunk, values, strict=True):
            self._results[c] = float(value)

    def results(self) -> list[float]:
        """Fitness of every candidate of the call, in the call's order (duplicates included)."""
        missing = [list(self.unique[c]) for c, v in enumerate(self._results) if v is None]
        if missing:
            raise RuntimeError(f"{len(missing)} candidate(s) were never evaluated, e.g. {missing[0]}")
        by_genome = dict(zip(self.unique, self._results, strict=True))
        return [by_genome[g] for g in self.genomes]
