"""Prefix cache: candidates run from their first changed decoder block on the reference genome's recorded
hidden states, and give bit-identical fitness on every model family."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_search_io import SEQ_LEN, _build, _ladders, _space
from tests.tiny import FAMILIES, random_tokens, tiny_model
from tyr.evaluators.teacher import compute_and_save_teacher_targets
from tyr.search.batch import Batch
from tyr.search.evaluator import SerialEvaluator
from tyr.search.evolution import sample_offspring
from tyr.search.prefix import choose_reference, shared_prefix
from tyr.search.scheduling import unit_blocks
from tyr.supernet.families import adapter_for


def test_shared_prefix_counts_whole_blocks():
    a = (0, 0, 0, 0, 0, 0)  # 3 blocks x (attention, MLP)
    assert shared_prefix(a, a) == 3
    assert shared_prefix(a, (0, 0, 0, 1, 0, 0)) == 1  # block 1's MLP differs
    assert shared_prefix(a, (1, 0, 0, 0, 0, 0)) == 0
    assert shared_prefix(a, (0, 0, 0, 0, -1, 1)) == 2


def test_the_reference_is_the_genome_the_others_share_most_with():
    # total blocks the others reuse: 0, 2 + 0, 2 + 0 -> the first of the two best
    assert choose_reference([(1, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 0, 1, 0)]) == 1
    # a parent and its children: the parent saves 1 + 2 + 0 blocks, and so does the child that changes last
    parent = (0, 0, 0, 0, 0, 0)
    genomes = [(0, 0, 1, -1, 0, 0), (1, -1, 0, 0, 0, 0), parent, (0, 0, 0, 0, 1, -1)]
    assert choose_reference(genomes) == 2
    assert choose_reference([parent]) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_gives_the_same_bits_and_skips_blocks(family, tmp_path):
    model, tokens = tiny_model(family, num_layers=4), random_tokens(7, SEQ_LEN, seed=2)
    ladders = _ladders(adapter_for(model))
    store = _build(tmp_path / "supernet", model, tokens, ladders)
    targets = compute_and_save_teacher_targets(model, tokens, 20, tmp_path / "teacher", batch_size=4)
    space = _space(store)
    parent = (0,) * len(space.genes)
    children = sample_offspring(parent, space, np.random.default_rng(1), 10, 3)
    genomes = [*children, parent]
    batches = [
        Batch(range(7)),
        Batch((1, 3, 4, 6)),
        Batch((0, 5), 9),
    ]  # 2 blocks of 3 (+1); 1 block; prefixes

    def values(prefix_cache_bytes):
        evaluator = SerialEvaluator(
            model,
            adapter_for(model),
            store,
            targets,
            tokens,
            batch_size=3,
            prefix_cache_bytes=prefix_cache_bytes,
        )
        try:
            return [evaluator.evaluate(genomes, b) for b in batches], evaluator.prefix
        finally:
            evaluator.close()

    plain, _ = values(0)
    cached, prefix = values(1 << 30)
    assert cached == plain  # bit-identical, every candidate, every batch
    reference = genomes[choose_reference(genomes)]
    expected = sum(
        shared_prefix(reference, g) * len(unit_blocks(len(b.sequences), 3))
        for g in genomes
        if g != reference
        for b in batches
    )
    assert prefix.blocks_skipped == expected > 0
    tight, prefix = values(1)  # a budget nothing fits in: every candidate runs in full
    assert tight == plain and prefix.blocks_skipped == 0
