"""Scheduling one fitness call over several workers (the backend-independent part).

A distributed backend (Ray, in `tyr.cluster`) owns the workers; this module decides what each of them does.

Work unit = (candidate, block): a block is `batch_size` consecutive sequences of the call's batch at fixed
boundaries (sequences [0:bs], [bs:2bs], ... of `Batch.sequences`, `unit_blocks`), i.e. exactly one forward. A
unit's result is one float64 KL sum per sequence; a candidate's fitness is the float64 sum of its sequences'
sums in sequence order over the number of scored tokens (`tyr.evaluators.kl.kl_mean`). The serial evaluator
computes the same units and reduces the same way, so fitness is bit-identical whatever the number of workers,
the assignment or the completion order.

Who gets which unit (`WorkQueue.take_chunk`, called through `assign`):
- workers pull work, in chunks of ceil(pending units / (depth x workers)): big chunks save round trips early,
  single units balance the end, and `depth` calls in flight per worker keep it busy between chunks;
- home blocks: the blocks are split into min(blocks, workers) contiguous ranges and a worker takes units of its
  own range first. It then reads only its share of the batch's teacher rows (the serial evaluator reads each
  block's rows once per call; at K = 8192 one 4096-token sequence's rows are 200 MB, more than the swap of a
  candidate's genes costs), and a late stage of few candidates on many sequences is spread over all workers;
- within a range, candidates go in nearest-genome order (fewest differing genes, so fewest module swaps) and
  one candidate's units are taken together, consecutively, so the worker swaps genes once per candidate;
- a worker whose range is done takes units of blocks it already holds, then steals from the range with the
  most pending units (nearest candidate first).
Duplicate genomes are evaluated once. A dead worker's units are re-queued.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from tyr.errors import TyrError
from tyr.evaluators.kl import kl_mean
from tyr.search.space import Genome

Block = tuple[int, int]  # [start, stop) positions in Batch.sequences: one forward
Unit = tuple[int, int]  # (candidate index into WorkQueue.unique, block index into WorkQueue.blocks)


def unit_blocks(num_sequences: int, batch_size: int) -> list[Block]:
    """The fixed blocks of a batch of `num_sequences` sequences: [0:bs], [bs:2bs], ..., the last one shorter."""
    if num_sequences < 1 or batch_size < 1:
        raise TyrError(f"need at least one sequence and batch_size >= 1, got {num_sequences}, {batch_size}")
    return [(s, min(s + batch_size, num_sequences)) for s in range(0, num_sequences, batch_size)]


def home_blocks(rank: int, num_workers: int, num_blocks: int) -> range:
    """Worker `rank`'s share of `num_blocks` blocks: min(blocks, workers) contiguous ranges, range = rank mod that
    (with more workers than blocks, several workers share one block)."""
    num_ranges = max(1, min(num_blocks, num_workers))
    r = rank % num_ranges
    return range(r * num_blocks // num_ranges, (r + 1) * num_blocks // num_ranges)


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
    here = start
    for _ in range(min(length, len(pending))):
        best = _nearest(table, here, pending)
        pending.remove(best)
        chain.append(best)
        here = genomes[best]
    return chain


def _nearest(table: np.ndarray, here: Genome | None, candidates: Sequence[int]) -> int:
    """The candidate (index into `table`'s rows) nearest to `here`; ties and an unknown `here`: the lowest index."""
    ids = np.asarray(sorted(candidates), dtype=np.int64)
    if here is None:
        return int(ids[0])
    distance = (table[ids] != np.asarray(here, dtype=np.int64)).sum(axis=1)  # (len(ids),)
    return int(ids[np.argmin(distance)])  # argmin: the first (lowest index) of the nearest


class WorkQueue:
    """The units of one fitness call: what is pending, how often each was tried, and the per-sequence results.

    Args:
        genomes: the call's candidates (duplicates allowed; each unique genome is evaluated once).
        blocks: the call's blocks (`unit_blocks`); one unit per (unique genome, block).
        max_attempts: how many times one unit may be handed out (it is re-queued when its worker dies); beyond
            that the candidate itself is assumed to crash workers and TyrError is raised.
    """

    def __init__(self, genomes: Sequence[Genome], blocks: Sequence[Block], max_attempts: int):
        self.genomes = [tuple(int(v) for v in g) for g in genomes]
        self.unique: list[Genome] = list(dict.fromkeys(self.genomes))
        self.blocks = [(int(a), int(b)) for a, b in blocks]
        self.pending: list[Unit] = [(c, b) for c in range(len(self.unique)) for b in range(len(self.blocks))]
        self.attempts: Counter[Unit] = Counter()
        self.max_attempts = max_attempts
        self.held: dict[int, set[int]] = {}  # worker -> blocks it was sent units of (it holds their rows)
        self._sums: dict[Unit, list[float]] = {}
        self._table = np.asarray(self.unique, dtype=np.int64).reshape(len(self.unique), -1)

    def chunk_size(self, num_workers: int, depth: int) -> int:
        """Units per call now: pending / (depth x workers), at least 1."""
        return max(1, math.ceil(len(self.pending) / (depth * max(num_workers, 1))))

    def take_chunk(self, worker: int, tail: Genome | None, home: Sequence[int], size: int) -> list[Unit]:
        """Remove and return up to `size` units for `worker`, whose model will hold `tail` (None: unknown).

        Units of the `home` blocks first, then of blocks the worker already holds, then stolen from the blocks
        with the most pending units. Within that choice: the pending candidate nearest to the genome the worker
        will hold, all its chosen units together (block order), then the next nearest.
        """
        held = self.held.setdefault(worker, set())
        home = set(home)
        chunk: list[Unit] = []
        here = tail
        while len(chunk) < size and self.pending:
            pool = (
                [u for u in self.pending if u[1] in home]
                or [u for u in self.pending if u[1] in held]
                or self._steal_order()
            )
            c = _nearest(self._table, here, {u[0] for u in pool})
            units = [u for u in pool if u[0] == c][: size - len(chunk)]
            for u in units:
                self.pending.remove(u)
                held.add(u[1])
            chunk += units
            here = self.unique[c]
        return chunk

    def _steal_order(self) -> list[Unit]:
        """Pending units, those of blocks with the most pending units first (the owner furthest behind)."""
        load = Counter(b for _, b in self.pending)
        return sorted(self.pending, key=lambda u: (-load[u[1]], u[1], u[0]))

    def requeue(self, units: Sequence[Unit], worker: int | None = None) -> None:
        """Put a dead worker's units back (its replacement holds no rows); TyrError when a candidate has crashed
        workers too often."""
        if worker is not None:
            self.held.pop(worker, None)
        for u in units:
            self.attempts[u] += 1
            if self.attempts[u] > self.max_attempts:
                raise TyrError(
                    f"evaluating genome {list(self.unique[u[0]])} crashed a worker {self.attempts[u]} times"
                )
        self.pending.extend(units)
        self.pending.sort()

    def complete(self, units: Sequence[Unit], sums: Sequence[Sequence[float]]) -> None:
        """Record each unit's per-sequence KL sums (one per sequence of its block)."""
        for u, values in zip(units, sums, strict=True):
            start, stop = self.blocks[u[1]]
            if len(values) != stop - start:
                raise RuntimeError(f"unit {u} returned {len(values)} sums for {stop - start} sequences")
            self._sums[u] = [float(v) for v in values]

    def results(self, num_positions: int) -> list[float]:
        """Fitness of every candidate of the call, in the call's order (duplicates included): its per-sequence
        sums in sequence order, reduced by `kl_mean` over `num_positions` scored positions per sequence."""
        missing = [u for u in ((c, b) for c in range(len(self.unique)) for b in range(len(self.blocks)))
                   if u not in self._sums]  # fmt: skip
        if missing:
            raise RuntimeError(
                f"{len(missing)} unit(s) were never evaluated, e.g. {list(self.unique[missing[0][0]])}"
            )
        fitness = {
            g: kl_mean([v for b in range(len(self.blocks)) for v in self._sums[(c, b)]], num_positions)
            for c, g in enumerate(self.unique)
        }
        return [fitness[g] for g in self.genomes]


class WorkerView(Protocol):
    """What the scheduler knows about one worker (`tyr.cluster`'s slots, the benchmark's simulated workers)."""

    index: int  # stable identity (the slot)
    tail: Genome | None  # the genome its model will hold once its calls in flight are done
    in_flight: int  # calls sent and not yet answered


def assign(
    queue: WorkQueue, workers: Sequence[WorkerView], depth: int
) -> list[tuple[WorkerView, list[Unit]]]:
    """Hand out calls to the ready `workers`: rounds over those with fewer than `depth` calls in flight (the least
    loaded first, then by index), one chunk each, until all have `depth` or nothing is pending. Each worker's
    home blocks follow its rank among `workers`. Updates `tail` and `in_flight`; returns (worker, units) per call.
    """
    ranks = {w.index: r for r, w in enumerate(sorted(workers, key=lambda w: w.index))}
    calls = []
    while queue.pending:
        free = sorted((w for w in workers if w.in_flight < depth), key=lambda w: (w.in_flight, w.index))
        if not free:
            break
        for w in free:
            if not queue.pending:
                break
            home = home_blocks(ranks[w.index], len(workers), len(queue.blocks))
            chunk = queue.take_chunk(w.index, w.tail, home, queue.chunk_size(len(workers), depth))
            w.in_flight += 1
            w.tail = queue.unique[chunk[-1][0]]
            calls.append((w, chunk))
    return calls
