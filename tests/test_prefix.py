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


def test_a_ray_workers_chunk_replays_its_reference_with_the_same_bits(tiny_assets, tmp_path):
    """On Ray each worker gets chunks of work units (several candidates on its home blocks in early stages): the
    chunk's reference runs first and the others replay it. Here the worker class runs in-process (what each
    actor holds), on a real run directory, with the cache on and off."""
    from tests.conftest import smoke_args
    from tyr.cli import main
    from tyr.cluster import _shippable_config, _Worker
    from tyr.rundir import RunDir
    from tyr.supernet.store import SupernetStore

    out = tmp_path / "run"
    assert (
        main(
            smoke_args(
                tiny_assets, out, "--set", "search.num_iterations=1", "--set", "search.generations=[1]"
            )
        )
        == 0
    )
    run = RunDir(out)
    cfg = run.load_config()
    store = SupernetStore.open(run.supernet_dir(1))
    space = _space(store)
    parent = tuple(run.read_result(1)["genome"])
    children = sample_offspring(parent, space, np.random.default_rng(5), 5, 2)
    batch = Batch(tuple(range(cfg.data.num_sequences)))
    units = [[list(g), a, b] for g in (*children[:2], parent, *children[2:]) for a, b in ((0, 4), (4, 8))]

    def sums(prefix_cache_bytes):
        cfg.search.prefix_cache_bytes = prefix_cache_bytes
        spec = {"config": _shippable_config(cfg), "run_dir": str(out), "num_threads": 1, "num_gpus": 0}
        worker = _Worker(spec)
        result = worker.evaluate(str(run.supernet_dir(1)), store.fingerprint_hash, units, batch.to_json())
        prefix = worker.evaluator.prefix
        return result["sums"], 0 if prefix is None else prefix.blocks_skipped

    plain, skipped_off = sums(0)
    cached, skipped_on = sums(1 << 30)
    assert cached == plain and skipped_off == 0 and skipped_on > 0
