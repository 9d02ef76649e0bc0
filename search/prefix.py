"""Prefix cache: run a candidate from its first changed decoder block, reusing a reference genome's hidden states.

Candidates of one fitness call differ from each other in a few genes (children differ from their parent by a few
level switches), and a decoder block's output depends only on its input and its own two genes. So when a
candidate agrees with a reference genome on every gene of blocks 0..k-1, its hidden states after block k-1 are
the reference's on the same sequences: the forward can start at block k. `PrefixCache` records the reference's
block outputs (forward hooks) for each block of sequences of a batch, within a byte budget, and replays them
into a later forward (the first k blocks return the recorded tensors instead of computing). The replayed tensors
are exactly those the full forward would compute (same inputs, same weights, same shapes), so fitness values are
bit-identical with and without the cache (tests/test_prefix.py checks it on every model family).

What it costs: the reference's output of every block for each cached block of sequences,
blocks x sequences x positions x hidden x dtype bytes (`block_bytes`), on the model's device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from tyr.search.space import Genome
from tyr.supernet.variant import GENE_KINDS

__all__ = ["PrefixCache", "choose_reference", "shared_prefix"]

_GENES_PER_LAYER = len(GENE_KINDS)


def shared_prefix(a: Genome, b: Genome) -> int:
    """Leading decoder blocks on which genomes `a` and `b` agree (every gene of the block equal)."""
    differ = np.flatnonzero(np.asarray(a) != np.asarray(b))
    num_layers = len(a) // _GENES_PER_LAYER
    return num_layers if differ.size == 0 else int(differ[0]) // _GENES_PER_LAYER


def choose_reference(genomes: Sequence[Genome]) -> int:
    """Index of the genome whose recorded blocks the others would reuse most (largest total shared prefix;
    the first such on a tie). A parent among its children attains that maximum; so does the child whose first
    change comes last, and replaying either saves the same."""
    table = np.asarray(genomes, dtype=np.int64).reshape(len(genomes), -1)
    num_layers = table.shape[1] // _GENES_PER_LAYER
    differ = (
        (table[:, None, :] != table[None, :, :]).reshape(len(genomes), len(genomes), num_layers, -1).any(-1)
    )
    # first differing block per pair (num_layers where they agree everywhere)
    first = np.where(differ.any(-1), differ.argmax(-1), num_layers)
    np.fill_diagonal(first, 0)  # a genome reuses nothing of itself
    return int(np.argmax(first.sum(1)))


class PrefixCache:
    """Recorded decoder-block outputs of one reference genome, per block of sequences of one batch.

    Args:
        layers: the model's decoder blocks, in order.
        max_bytes: budget for the recorded tensors; a block of sequences that does not fit is not recorded
            (its candidates run in full).
    """

    def __init__(self, layers: Sequence[nn.Module], max_bytes: int):
        self.layers = list(layers)
        self.max_bytes = int(max_bytes)
        self.reference: Genome | None = None
        self.key: tuple | None = None  # the batch the recordings belong to
        self._outputs: dict[tuple[int, int], list] = {}  # block of sequences -> each decoder block's output
        self.bytes = 0
        self.blocks_skipped = 0  # decoder blocks not computed thanks to the cache (a counter for benchmarks)

    def reset(self, reference: Genome | None = None, key: tuple | None = None) -> None:
        """Forget every recording; later recordings belong to `reference` on the batch `key`."""
        self._outputs, self.bytes = {}, 0
        self.reference, self.key = reference, key

    def usable(self, genome: Genome, key: tuple, block: tuple[int, int]) -> int:
        """How many leading decoder blocks `genome` may replay on `block` of batch `key` (0: none)."""
        if self.reference is None or key != self.key or block not in self._outputs:
            return 0
        return shared_prefix(self.reference, genome)

    @contextlib.contextmanager
    def recording(self, block: tuple[int, int], block_bytes: int) -> Iterator[None]:
        """Record every decoder block's output during the forward inside (when `block_bytes` fits the budget)."""
        if self.bytes + block_bytes > self.max_bytes or block in self._outputs:
            yield
            return
        outputs: list = [None] * len(self.layers)

        def hook(i):
            def keep(module, args, output):
                outputs[i] = output

            return keep

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if all(o is not None for o in outputs):
            self._outputs[block] = outputs
            self.bytes += block_bytes

    @contextlib.contextmanager
    def replaying(self, block: tuple[int, int], num_blocks: int) -> Iterator[None]:
        """The first `num_blocks` decoder blocks return the recorded outputs instead of computing (an instance
        `forward` shadows the class's; the module's hooks still run, so device placement hooks keep working)."""
        outputs = self._outputs[block]
        replaced = self.layers[: min(num_blocks, len(self.layers))]
        for layer, output in zip(replaced, outputs, strict=False):
            layer.forward = _replay(output)
        try:
            yield
        finally:
            for layer in replaced:
                del layer.forward
        self.blocks_skipped += len(replaced)


def _replay(output):
    def forward(*args, **kwargs):
        return output

    return forward


def block_bytes(
    num_layers: int, num_sequences: int, num_positions: int, hidden: int, dtype: torch.dtype
) -> int:
    """Bytes the recording of one block of sequences holds: one hidden state per decoder block."""
    return num_layers * num_sequences * num_positions * hidden * torch.empty(0, dtype=dtype).element_size()
