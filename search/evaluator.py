"""Fitness backends behind one protocol: `evaluate(genomes, sequence_indices) -> list[float]`.

`SerialEvaluator` runs in-process on one model (the reference implementation: the Ray backend must give the
same numbers). Fitness is the sparse top-K KL(dense ‖ candidate) on the selected calibration sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tyr.evaluators.kl import sparse_kl_targets
from tyr.evaluators.teacher import TeacherTargets
from tyr.search.space import Genome
from tyr.supernet.families import ModelAdapter
from tyr.supernet.realise import Realiser
from tyr.supernet.store import SupernetStore
from tyr.supernet.variant import Variant, genes_of


class SerialEvaluator:
    """Evaluates candidates one after another on a single model, swapping only the genes that change."""

    def __init__(
        self,
        model: torch.nn.Module,
        adapter: ModelAdapter,
        store: SupernetStore,
        targets: TeacherTargets,
        tokens: torch.Tensor,
        mode: str = "compact",
        batch_size: int = 8,
        progress: bool = False,
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

    def variants(self, genome: Genome) -> list[Variant]:
        return [self.store.variant(gene, level) for gene, level in zip(self.genes, genome, strict=True)]

    def apply(self, genome: Genome) -> None:
        """Realise `genome` on the model (only changed genes are swapped)."""
        self.realiser.apply(self.variants(genome))

    def __call__(self, genomes: Sequence[Genome], sequence_indices: np.ndarray) -> list[float]:
        scores = []
        desc = f"candidates x {len(sequence_indices)} seqs"
        for genome in tqdm(genomes, desc=desc, leave=False, disable=not self.progress):
            self.apply(genome)
            scores.append(
                sparse_kl_targets(
                    self.model,
                    self.tokens,
                    self.targets,
                    sequence_indices.tolist(),
                    batch_size=self.batch_size,
                )
            )
            self.num_evaluations += 1
        return scores

    def close(self) -> None:
        """Give the model back in its dense form."""
        self.realiser.restore_dense()
