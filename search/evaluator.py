"""Fitness backends behind one protocol: `evaluate(genomes, batch) -> list[float]` (`tyr.search.batch.Batch`).

`SerialEvaluator` runs in-process on one model (the reference implementation: the Ray backend must give the
same numbers). Fitness is the sparse top-K KL(dense ‖ candidate) on the batch's calibration tokens, computed as
work units (`tyr.search.scheduling`): a unit is one candidate on one block of `batch_size` consecutive sequences
of the batch (fixed boundaries, one forward) and gives one float64 KL sum per sequence; the fitness is their sum
in sequence order over the scored tokens (`tyr.evaluators.kl.kl_mean`); with stored teacher hidden states
(`search.fitness: kl+hidden`) each sequence's sum also holds its weighted hidden-state error. A distributed backend spreads the same
units over workers (`unit_sums`) and reduces them the same way, so the values are the same bits.

What moves per call, and why it is little:
- teacher rows: each block's rows are read once per call (kept for the next call on the same batch) and shared
  by all its candidates; on a GPU they are moved to the device once, or pinned. A worker that evaluates only
  some blocks reads only those.
- variants: a candidate loads and swaps only the genes whose level differs from the model's current
  realisation, and a call's candidates are taken in nearest-genome order (`nearest_chain`) so consecutive
  candidates differ in few genes. The iteration's supernet stays in the store's cache when it fits
  (`variant_cache_bytes`, auto: the whole supernet if it fits in a share of the host memory).
- hashes: every variant file's sha256 is checked once, on the first call (or already by the build that wrote
  it); later reads check file sizes only.
Every change of this is counted (`io_counters`) and lands in the search's history.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from tyr.errors import TyrError
from tyr.evaluators.hidden import TeacherHidden, capturing, hidden_sums
from tyr.evaluators.kl import kl_mean, model_device, place_targets, sparse_kl_sums
from tyr.evaluators.teacher import TeacherTargets
from tyr.search.batch import Batch, as_batch
from tyr.search.counters import IOCounters
from tyr.search.prefix import PrefixCache, block_bytes, choose_reference
from tyr.search.scheduling import Block, nearest_chain, unit_blocks
from tyr.search.space import Genome
from tyr.supernet.families import ModelAdapter
from tyr.supernet.realise import Realiser
from tyr.supernet.store import SupernetStore, resolve_cache_bytes, resolve_device_cache_bytes
from tyr.supernet.variant import Variant, genes_of


class SerialEvaluator:
    """Evaluates candidates one after another on a single model, swapping only the genes that change.

    Args:
        variant_cache_bytes: the store's variant cache for the search; None = auto (the whole supernet when it
            fits in `host_memory_share` of the available host memory, else an LRU of that share).
        host_memory_share: the share of available host memory an auto cache may take.
        variant_device_bytes: bytes of cached variants kept on the model's GPU (a swap is then a copy on the
            device); None = auto: the whole supernet when it fits in 40% of the free device memory, else none.
            Nothing on a CPU or a model spread over several devices. Values do not change.
        prefetch_rows: read each call's teacher rows on a reader thread, ahead of the forwards that use them
            (the same values and byte counts as reading them on demand).
        prefix_cache_bytes: budget of `tyr.search.prefix.PrefixCache` for `evaluate` (0: off): each call records
            a reference genome's decoder-block outputs and runs the other candidates from their first changed
            block. Values are bit-identical either way.
        hidden: the teacher's stored hidden states (`search.fitness: kl+hidden`): each sequence's KL sum gets
            `hidden_weight` times its hidden-state error sum (`tyr.evaluators.hidden`). Rows it does not hold
            (the validation windows stacked after the calibration ones) are scored on KL alone.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        adapter: ModelAdapter,
        store: SupernetStore,
        targets: TeacherTargets | None,
        tokens: torch.Tensor,
        mode: str = "compact",
        batch_size: int = 8,
        progress: bool = False,
        *,
        variant_cache_bytes: int | None = None,
        host_memory_share: float = 0.5,
        prefix_cache_bytes: int = 0,
        hidden: TeacherHidden | None = None,
        hidden_weight: float = 0.0,
        prefetch_rows: bool = True,
        variant_device_bytes: int | None = None,
    ):
        self.model = model
        self.store = store
        self.targets = targets
        self.tokens = tokens  # (num_sequences, seq_len): the calibration set the targets belong to
        self.batch_size = batch_size
        self.genes = genes_of(adapter.num_layers)
        self.realiser = Realiser(model, adapter, mode)
        self.num_evaluations = 0
        self.progress = progress
        self.variant_cache_bytes = variant_cache_bytes
        self.variant_device_bytes = variant_device_bytes
        self.host_memory_share = host_memory_share
        self.tail: Genome | None = None  # the genome the model holds (None: dense or unknown)
        # the realised variant per gene (one genome's variants stay referenced, even beyond an LRU's bytes)
        self._applied: list[Variant | None] = [None] * len(self.genes)
        self._levels: list[int | None] = [None] * len(self.genes)
        self._rows_key: tuple | None = None  # the batch whose rows `_rows` holds: (sequences, positions)
        self._rows: dict[Block, tuple] = {}  # block -> (values, indices, hidden states or None)
        # One reader thread: every host read of teacher rows goes through it (so counters never race), ahead of
        # the forwards when the blocks to come are known (`prefetch_rows`).
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="tyr-rows") if prefetch_rows else None
        self._reads: dict[tuple, Future] = {}  # (batch key, block) -> its host rows being read
        self.rows_prefetched = 0  # blocks whose rows were read ahead of their first use
        self._prepared = False
        self.hidden, self.hidden_weight = hidden, float(hidden_weight)
        self._base = self._totals()
        self.num_layers = adapter.num_layers
        layers = [adapter.layer(i) for i in range(adapter.num_layers)]
        self.prefix = PrefixCache(layers, prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._hidden_modules = [layers[i] for i in hidden.layers] if hidden is not None else []

    # ---- counters ------------------------------------------------------------------------------
    def _totals(self) -> IOCounters:
        return IOCounters(
            variant_bytes_read=self.store.bytes_read,
            num_variant_files_hashed=self.store.files_hashed,
            teacher_bytes_read=(self.targets.bytes_read if self.targets is not None else 0)
            + (self.hidden.bytes_read if self.hidden is not None else 0),
            num_genes_swapped=self.realiser.swaps,
        )

    @property
    def io_counters(self) -> IOCounters:
        """I/O since this evaluator was created."""
        return self._totals() - self._base

    # ---- realisation ---------------------------------------------------------------------------
    def apply(self, genome: Genome) -> None:
        """Realise `genome` on the model, loading and swapping only the genes whose level changed."""
        genome = tuple(int(v) for v in genome)
        if genome == self.tail:
            return
        if len(genome) != len(self.genes):
            raise TyrError(f"genome has {len(genome)} genes but the model has {len(self.genes)}")
        variants = [
            self._applied[g] if self._levels[g] == level else self.store.variant(gene, level)
            for g, (gene, level) in enumerate(zip(self.genes, genome, strict=True))
        ]
        self.tail = None  # unknown if realisation fails half-way
        self.realiser.apply(variants)
        self._applied, self._levels, self.tail = variants, list(genome), genome

    def _prepare(self) -> None:
        """Once, on the first call: size the variant cache, and verify every variant file not yet verified
        (reading it once; the cache keeps what fits, so a resident supernet is loaded by the same read)."""
        if self._prepared:
            return
        share = self.host_memory_share
        total = self.store.total_bytes()
        self.store.set_cache_bytes(resolve_cache_bytes(self.variant_cache_bytes, total, share))
        devices = {p.device for p in self.model.parameters()}
        device = next(iter(devices)) if len(devices) == 1 else None
        self.store.set_device_cache(
            device, resolve_device_cache_bytes(self.variant_device_bytes, total, device)
        )
        if self.store.hash_files:
            self.store.verify(keep=True)
        self._prepared = True

    # ---- fitness -------------------------------------------------------------------------------
    def __call__(self, genomes: Sequence[Genome], batch: Batch) -> list[float]:
        """Fitness of each genome on `batch`, in call order; each distinct genome is evaluated once, in
        nearest-genome order from the one the model holds."""
        genomes = [tuple(int(v) for v in g) for g in genomes]
        batch = as_batch(batch)  # plain sequence indices: whole sequences
        unique = list(dict.fromkeys(genomes))
        order = nearest_chain(self.tail, unique, list(range(len(unique))), len(unique))
        values = self.evaluate([unique[i] for i in order], batch)
        by_genome = dict(zip([unique[i] for i in order], values, strict=True))
        return [by_genome[g] for g in genomes]

    def evaluate(self, genomes: Sequence[Genome], batch: Batch) -> list[float]:
        """Fitness of each genome on `batch`, evaluated in the given order (a scheduler chose it): every unit of
        a genome (its blocks in order), reduced in sequence order."""
        batch = as_batch(batch)
        self._check_ready()
        blocks = unit_blocks(len(batch.sequences), self.batch_size)
        positions = batch.positions(self.targets.seq_len)
        genomes = [tuple(int(v) for v in g) for g in genomes]
        order = list(range(len(genomes)))
        if self.prefix is not None and len(genomes) > 1:  # the reference first: the others replay its blocks
            reference = choose_reference(genomes)
            order = [reference, *(i for i in order if i != reference)]
            self.prefix.reset(genomes[reference], (batch.sequences, positions))
        self.prefetch_rows(batch, blocks)
        scores: list[float] = [math.nan] * len(genomes)
        desc = f"candidates x {len(batch.sequences)} seqs"
        for i in tqdm(order, desc=desc, leave=False, disable=not self.progress):
            sums = [v for block in blocks for v in self.unit_sums(genomes[i], batch, block)]
            scores[i] = kl_mean(sums, positions)
            self.num_evaluations += 1
        return scores

    def order_units(self, units: Sequence[tuple[Genome, Block]], batch: Batch) -> list[int]:
        """The order to score a chunk of work units in (indices into `units`), preparing the prefix cache for
        it: with the cache on and several genomes in the chunk, the one the others share most blocks with goes
        first and is recorded on each of its blocks, and the others replay it (a Ray worker's chunk: several
        candidates on the worker's home blocks in early stages). Values do not depend on the order."""
        order = list(range(len(units)))
        genomes = list(dict.fromkeys(tuple(int(v) for v in g) for g, _ in units))
        if self.prefix is None or len(genomes) < 2:
            return order
        self._check_ready()
        batch = as_batch(batch)
        reference = genomes[choose_reference(genomes)]
        self.prefix.reset(reference, (batch.sequences, batch.positions(self.targets.seq_len)))
        first = [i for i in order if tuple(int(v) for v in units[i][0]) == reference]
        rest = set(order) - set(first)
        return [*first, *(i for i in order if i in rest)]

    def unit_sums(self, genome: Genome, batch: Batch, block: Block) -> list[float]:
        """One work unit: `genome`'s KL sum over the scored positions of each sequence of
        `batch.sequences[start:stop]` (one forward), float64, in sequence order."""
        self._check_ready()
        start, stop = block
        if not 0 <= start < stop <= len(batch.sequences) or stop - start > self.batch_size:
            raise TyrError(
                f"block [{start}:{stop}] is not a block of {len(batch.sequences)} sequences in forwards of "
                f"{self.batch_size} (search.batch_size must be the same for every worker)"
            )
        self.apply(genome)
        sequences = batch.sequences[start:stop]
        values, indices, teacher_hidden = self._block_rows(batch, (start, stop))
        ids = self.tokens[list(sequences), : values.shape[1]]  # (stop - start, P)
        capture = capturing(self._hidden_modules) if teacher_hidden is not None else contextlib.nullcontext()
        with self._prefix_context(genome, batch, block, ids.shape), capture as outputs:
            sums = sparse_kl_sums(self.model, ids, values, indices, batch_size=self.batch_size)
        if teacher_hidden is not None:  # same reduction as the KL: per sequence, float64
            sums = sums + self.hidden_weight * hidden_sums(outputs, teacher_hidden, self.hidden.scales)
        return sums.tolist()

    def _prefix_context(self, genome: Genome, batch: Batch, block: Block, shape: tuple[int, int]):
        """Record (the call's reference genome) or replay (a candidate sharing its first blocks) decoder-block
        outputs of this unit's forward; nothing without a prefix cache."""
        prefix = self.prefix
        if prefix is None or prefix.reference is None:
            return contextlib.nullcontext()
        key = (batch.sequences, batch.positions(self.targets.seq_len))
        if genome == prefix.reference:
            embedding = self.model.get_input_embeddings().weight
            size = block_bytes(self.num_layers, shape[0], shape[1], embedding.shape[1], embedding.dtype)
            return prefix.recording(block, size) if key == prefix.key else contextlib.nullcontext()
        usable = prefix.usable(genome, key, block)
        return prefix.replaying(block, usable) if usable else contextlib.nullcontext()

    def _check_ready(self) -> None:
        if self.targets is None:
            raise TyrError("this evaluator has no teacher targets: it can only apply genomes")
        self._prepare()

    def prefetch_rows(self, batch: Batch, blocks: Sequence[Block]) -> None:
        """Start reading the teacher rows of `blocks` of `batch` (in that order) on the reader thread, so the
        reads overlap the forwards of the blocks before them; the values are the same as read on demand."""
        if self._reader is None or self.targets is None:
            return
        batch = as_batch(batch)
        key = (batch.sequences, batch.positions(self.targets.seq_len))
        for block in blocks:
            if (key != self._rows_key or block not in self._rows) and (key, block) not in self._reads:
                self._reads[(key, block)] = self._reader.submit(self._read_rows, batch, block)
                self.rows_prefetched += 1

    def _read_rows(self, batch: Batch, block: Block) -> tuple:
        """A block's rows in host memory: (values, indices, hidden states or None; see `_block_rows`)."""
        positions = batch.positions(self.targets.seq_len)
        sequences = batch.sequences[block[0] : block[1]]
        values, indices = self.targets.get(sequences, positions)
        hidden = None
        if self.hidden is not None and max(sequences) < self.hidden.num_sequences:
            hidden = self.hidden.get(sequences, positions)
        return values, indices, hidden

    def _block_rows(
        self, batch: Batch, block: Block
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A block's teacher rows (values, indices), each (stop - start, P, K), and its stored hidden states
        (stop - start, P, L, D) or None (no kl+hidden fitness, or rows it does not hold: validation windows);
        read once (ahead of time when prefetched), kept until another batch."""
        positions = batch.positions(self.targets.seq_len)
        key = (batch.sequences, positions)
        if self._rows_key != key:
            self._rows, self._rows_key = {}, key  # free the previous batch's rows before reading the next
            for old in [k for k in self._reads if k[0] != key]:
                self._reads.pop(old).cancel()  # another batch's reads ahead: not needed any more
        if block not in self._rows:
            pending = self._reads.pop((key, block), None)
            if pending is None and self._reader is not None:
                pending = self._reader.submit(self._read_rows, batch, block)
            values, indices, hidden = (
                pending.result() if pending is not None else self._read_rows(batch, block)
            )
            # beside the logits they meet: the head's device (the last GPU of a balanced model)
            head = self.model.get_output_embeddings()
            device = head.weight.device if head is not None else model_device(self.model)
            self._rows[block] = (*place_targets(values, indices, device), hidden)
        return self._rows[block]

    def close(self) -> None:
        """Give the model back in its dense form and release the held supernet and teacher rows."""
        if self._reader is not None:
            for pending in self._reads.values():
                pending.cancel()
            self._reads.clear()
            self._reader.shutdown(wait=True)
            self._reader = None
        self.realiser.restore_dense()
        self._applied = [None] * len(self.genes)
        self._levels = [None] * len(self.genes)
        self.tail = None
        self._rows, self._rows_key = {}, None
        if self.prefix is not None:
            self.prefix.reset()
        self.store.clear_cache()
