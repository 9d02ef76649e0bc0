"""Scheduling one fitness call's candidates over several workers (the backend-independent part).

A distributed backend (Ray, in `tyr.cluster`) owns the workers; this module decides what each of them does.
Workers pull work: a free worker takes the pending candidates closest (fewest differing genes) to the genome
it will have applied, so it swaps few genes, in chunks that shrink as the queue empties, so no worker idles
while work is left (the serial evaluator orders a call's candidates by the same `nearest_chain`). Duplicate
genomes are evaluated once. Fitness depends only on (genome, batch), so results do not depend on the number
of workers, the assignment or the completion order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tyr.errors import TyrError
from tyr.search.space import Genome


def genome_distance(a: Genome | None, b: Genome) -> int:
    """Genes that differ between `a` and `b`; an unknown genome (None) is farther than any known one."""
    if a is None:
        return len(b) + 1
    return sum(x != y for x, y in zip(a, b))


def nearest_chain(
    start: Genome | None, genomes: Sequence[Genome], pending: list[int], length: int
) -> list[int]:
    """Remove and return up to `length` indices of `pending`: from `start`, each time the pending genome
    nearest to the last one taken (`genome_distance`; ties: the lowest index). The order in which a model
    realises them with few gene swaps.
    """
    table = np.asarray(genomes, dtype=np.int64).reshape(len(genomes), -1)  # (num_genomes, num_genes)
    chain: list[int] = []
    here = None if start is None else np.asarray(start, dtype=np.int64)
    for _ in range(min(length, len(pending))):
        candidates = np.asarray(pending, dtype=np.int64)
        if here is None:
            best = int(candidates.min())
        else:
            distance = (table[candidates] != here).sum(axis=1)
            best = int(candidates[np.lexsort((candidates, distance))[0]])
        pending.remove(best)
        chain.append(best)
        here = table[best]
    return chain


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
        return nearest_chain(tail, self.unique, self.pending, size)

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
