"""What a search moves: teacher rows once per batch, only changed genes loaded and swapped, each variant file
hashed once, the supernet resident when it fits, per-gene build records; fitness bitwise unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import random_tokens, tiny_model
from tyr.errors import TyrError
from tyr.evaluators.kl import sparse_kl_targets
from tyr.evaluators.teacher import compute_and_save_teacher_targets
from tyr.search.batch import Batch
from tyr.search.evaluator import SerialEvaluator
from tyr.search.evolution import EvolutionConfig, Stage, sample_offspring
from tyr.search.space import GeneLadder, SearchSpace, budget_for_start
from tyr.search.state import evolve
from tyr.supernet.builder import BuildPlan, build_supernet
from tyr.supernet.families import adapter_for
from tyr.supernet.ladder import centre_for_sparsity, make_ladder, step_units
from tyr.supernet.pruner import PrunerOptions
from tyr.supernet.realise import Realiser
from tyr.supernet.store import (
    MANIFEST,
    RECORDS,
    SupernetStore,
    resolve_cache_bytes,
    resolve_device_cache_bytes,
)
from tyr.supernet.variant import genes_of

SEQ_LEN = 16


def _ladders(adapter):
    out = []
    for gene in genes_of(adapter.num_layers):
        n = adapter.num_units(gene.kind)
        multiple = 1 if gene.kind == "attn" else 4
        out.append(
            make_ladder(gene, n, centre_for_sparsity(n, 0.5, multiple), step_units(n, 0.125, 1, multiple), 5)
        )
    return out


def _fingerprint(ladders) -> dict:
    return {
        "test": "search-io",
        "ladders": [[ld.gene.name, ld.num_units, ld.centre_removed] for ld in ladders],
    }


def _build(directory: Path, model, tokens, ladders) -> SupernetStore:
    store = SupernetStore.create_or_resume(directory, _fingerprint(ladders))
    plan = BuildPlan(ladders, mlp_options=PrunerOptions(num_rounds=4), batch_size=3)
    build_supernet(model, adapter_for(model), tokens, plan, store, progress=False)
    return store


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(supernet dir, targets, tokens, ladders) of a tiny model; each test loads its own model copy."""
    root = tmp_path_factory.mktemp("search-io")
    model, tokens = tiny_model("llama_gqa"), random_tokens(6, SEQ_LEN, seed=4)
    ladders = _ladders(adapter_for(model))
    _build(root / "supernet", model, tokens, ladders)
    targets = compute_and_save_teacher_targets(model, tokens, 20, root / "teacher", batch_size=4)
    return root / "supernet", targets, tokens, ladders


def _space(store: SupernetStore) -> SearchSpace:
    ladders = []
    for gene in store.genes():
        ladder, entries = store.ladder(gene), {e.level: e for e in store.level_entries(gene)}
        kept = tuple(ladder.num_units - ladder.removed(lv) for lv in ladder.levels)
        ladders.append(
            GeneLadder(gene, ladder.levels, kept, tuple(entries[lv].params for lv in ladder.levels))
        )
    start = (0,) * len(ladders)
    return SearchSpace(ladders, budget_for_start(ladders, start, "per_type"))


def _genomes(store: SupernetStore, n: int = 8) -> list[tuple[int, ...]]:
    start = (0,) * len(store.genes())
    return [start, *sample_offspring(start, _space(store), np.random.default_rng(3), n, 3)]


def _evaluator(built, mode="compact", **kw) -> SerialEvaluator:
    directory, targets, tokens, _ = built
    model = tiny_model("llama_gqa")
    store = kw.pop("store", None) or SupernetStore.open(directory)
    return SerialEvaluator(model, adapter_for(model), store, targets, tokens, mode, batch_size=4, **kw)


@pytest.mark.parametrize("mode", ["compact", "masked"])
def test_fitness_is_bitwise_what_a_full_fetch_per_candidate_gives(built, mode):
    """The old way: every gene's variant fetched and applied for every candidate, teacher rows read per
    candidate. Swapping only changed genes in nearest-genome order must give the very same floats."""
    directory, targets, tokens, _ = built
    store = SupernetStore.open(directory)
    genomes = _genomes(store)
    genomes = genomes + genomes[2:4]  # duplicates: evaluated once, returned in call order
    model = tiny_model("llama_gqa")
    realiser, genes = Realiser(model, adapter_for(model), mode), genes_of(3)
    evaluator = _evaluator(built, mode)
    for batch in (Batch((0, 2, 3, 5)), Batch((1, 4), 7), Batch((2,), 1)):
        want = []
        for genome in genomes:
            realiser.apply([store.variant(g, lv) for g, lv in zip(genes, genome)])
            want.append(
                sparse_kl_targets(
                    model, tokens, targets, batch.sequences, batch_size=4, num_positions=batch.num_positions
                )
            )
        assert evaluator(genomes, batch) == want
    unique = len(set(genomes))
    assert evaluator.num_evaluations == 3 * unique
    evaluator.close()


def test_teacher_rows_are_read_once_per_batch(built):
    directory, targets, tokens, _ = built
    evaluator = _evaluator(built)
    genomes = _genomes(evaluator.store, 5)
    row = SEQ_LEN * targets.k * 6  # fp16 value + int32 index per entry
    evaluator(genomes, Batch((1, 3, 4)))
    assert evaluator.io_counters.teacher_bytes_read == 3 * row
    evaluator(genomes[:2], Batch((1, 3, 4)))  # the same batch again: nothing read
    assert evaluator.io_counters.teacher_bytes_read == 3 * row
    evaluator(genomes, Batch((0, 2), 4))
    assert evaluator.io_counters.teacher_bytes_read == 3 * row + 2 * 4 * targets.k * 6
    evaluator.close()


def test_rows_read_ahead_give_the_same_values_and_reads(built):
    """Teacher rows read ahead on the reader thread (the default) give the bits and the byte counts of rows
    read on demand in the calling thread (prefetch_rows=False)."""
    ahead, on_demand = _evaluator(built), _evaluator(built, prefetch_rows=False)
    genomes = _genomes(ahead.store, 4)
    for batch in (Batch((0, 2, 3, 5, 1)), Batch((1, 4), 7), Batch((0, 2, 3, 5, 1))):
        assert ahead(genomes, batch) == on_demand(genomes, batch)
        assert ahead.io_counters == on_demand.io_counters
    assert ahead.rows_prefetched == 5 and on_demand.rows_prefetched == 0  # blocks: 2 + 1 + 2 (read again)
    ahead.close()
    on_demand.close()
    assert ahead._reader is None  # the reader thread is gone with the evaluator


def test_only_the_genes_that_change_are_loaded_and_swapped(built):
    directory, _, _, _ = built
    store = SupernetStore.open(directory)
    store.verify()  # as the build leaves it: every file verified once
    evaluator = _evaluator(built, store=store, variant_cache_bytes=0)  # no cache: every load is a read
    sizes = {(g.name, e.level): e.bytes for g in store.genes() for e in store.level_entries(g)}
    a = (0,) * 6
    b = (1, 0, -1, 0, 0, 0)  # two attention genes change
    evaluator([a], Batch((0,)))
    read, swapped = evaluator.io_counters.variant_bytes_read, evaluator.io_counters.num_genes_swapped
    assert read == sum(sizes[(g.name, 0)] for g in genes_of(3)) and swapped == 6
    evaluator([b], Batch((0,)))
    io = evaluator.io_counters
    assert io.variant_bytes_read - read == sizes[("0.attn", 1)] + sizes[("1.attn", -1)]
    assert io.num_genes_swapped - swapped == 2 and io.num_variant_files_hashed == 0
    evaluator.close()


def test_files_are_hashed_once_and_the_supernet_stays_resident(built, tmp_path):
    """A fresh store: the first generation verifies every file (one read, which also loads the resident
    supernet); afterwards nothing is hashed and nothing is read."""
    directory, targets, _, _ = built
    evaluator = _evaluator(built)  # auto cache: the tiny supernet fits
    num_files = sum(len(evaluator.store.level_entries(g)) for g in evaluator.store.genes())
    config = EvolutionConfig(num_generations=3, num_offspring=4, stages=(Stage(2, 8), Stage(1, 32)))
    evolve(
        _space(evaluator.store), config, evaluator, (0,) * 6, 5, tmp_path / "s.json", tmp_path / "h.jsonl", {},
        num_sequences=targets.num_sequences, seq_len=SEQ_LEN,
    )  # fmt: skip
    history = [json.loads(line) for line in (tmp_path / "h.jsonl").read_text().splitlines()]
    hashed = [h["io"]["num_variant_files_hashed"] for h in history]
    assert hashed == [num_files, 0, 0]
    assert [h["io"]["variant_bytes_read"] for h in history][1:] == [0, 0]
    assert history[0]["io"]["variant_bytes_read"] == evaluator.store.total_bytes()
    assert all(h["num_tokens"] == 4 * 8 + 3 * 32 for h in history)  # stage 1: 8-token prefixes
    evaluator.close()


def test_device_cache_keeps_variants_on_the_device_within_its_budget(built):
    """`set_device_cache` bookkeeping (the GPU path: no GPU here, so the meta device stands in for it): variants
    move to the device while the budget has room, the rest stay in host RAM, eviction gives the bytes back."""
    directory, _, _, _ = built
    store = SupernetStore.open(directory)
    gene = store.genes()[0]
    levels = sorted(e.level for e in store.level_entries(gene))[-3:]  # the sparsest: decreasing sizes
    sizes = [store.variant(gene, lv).weight.numel() * 4 for lv in levels]  # float32
    store.clear_cache()
    first = store.variant(gene, levels[0])  # cached in host RAM before the device cache exists
    meta = torch.device("meta")
    store.set_device_cache(meta, sizes[0] + sizes[1])
    assert store.variant(gene, levels[0]).weight.device == meta and store.device_bytes == sizes[0]
    assert first.weight.device.type == "cpu"  # a variant handed out before keeps its tensors
    assert store.variant(gene, levels[1]).weight.device == meta
    assert store.device_bytes == sizes[0] + sizes[1]
    third = store.variant(gene, levels[2])
    assert third.weight.device.type == "cpu" and store.device_bytes == sizes[0] + sizes[1]  # over budget
    assert third.kept.device.type == "cpu"
    store.set_cache_bytes(sizes[2])  # the LRU keeps the newest only: the device copies leave
    assert store.device_bytes == 0
    evaluator = _evaluator(built)  # a CPU model: nothing goes to a device cache
    evaluator(_genomes(evaluator.store, 2), Batch((0, 1)))
    assert evaluator.store.device_bytes == 0
    evaluator.close()


def test_resolve_device_cache_bytes():
    gpu = torch.device("cuda")
    assert resolve_device_cache_bytes(None, 10, torch.device("cpu")) == 0
    assert resolve_device_cache_bytes(123, 10, torch.device("cpu")) == 0  # host RAM is the cache on a CPU
    assert resolve_device_cache_bytes(None, 10, None) == 0  # a model spread over several devices
    assert resolve_device_cache_bytes(None, 40, gpu, free=100) == 40  # the whole supernet fits in 40%
    assert resolve_device_cache_bytes(None, 41, gpu, free=100) == 0
    assert resolve_device_cache_bytes(7, 41, gpu, free=100) == 7


def test_resolve_cache_bytes():
    assert resolve_cache_bytes(None, 100, share=0.5, available=1000) == 100  # resident
    assert resolve_cache_bytes(None, 600, share=0.5, available=1000) == 500  # an LRU of the share
    assert resolve_cache_bytes(7, 600, available=1000) == 7


def test_a_worker_store_checks_sizes_only(built, tmp_path):
    directory = tmp_path / "supernet"
    shutil.copytree(built[0], directory)
    path = directory / "0" / "mlp" / "+0.safetensors"
    data = bytearray(path.read_bytes())
    data[-4:] = b"\0\0\0\0"  # same size, other bytes: only a hash can tell
    path.write_bytes(bytes(data))
    gene = SupernetStore.open(directory).genes()[1]
    worker = SupernetStore.open(directory, hash_files=False)
    worker.variant(gene, 0)
    assert worker.files_hashed == 0 and worker.bytes_read == len(data)
    with pytest.raises(TyrError, match="corrupt"):
        SupernetStore.open(directory).variant(gene, 0)
    path.write_bytes(bytes(data[:-8]))
    worker.clear_cache()
    with pytest.raises(TyrError, match="changed size"):
        worker.variant(gene, 0)


def test_build_keeps_per_gene_records_and_writes_the_manifest_whole_once(built, tmp_path, monkeypatch):
    directory, _, tokens, ladders = built
    whole = json.loads((directory / MANIFEST).read_text())
    assert not (directory / RECORDS).exists() and all("levels" in g for g in whole["genes"].values())

    sizes, original = [], SupernetStore.write_gene

    def dying_write(self, *args, **kwargs):
        if len(sizes) == 3:
            raise KeyboardInterrupt  # killed after three finished genes
        original(self, *args, **kwargs)
        sizes.append((self.directory / MANIFEST).stat().st_size)

    monkeypatch.setattr(SupernetStore, "write_gene", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "sn", tiny_model("llama_gqa"), tokens, ladders)
    monkeypatch.setattr(SupernetStore, "write_gene", original)
    index = json.loads((tmp_path / "sn" / MANIFEST).read_text())
    assert len(index["genes"]) == 3 and not any("levels" in g for g in index["genes"].values())
    assert sorted(p.name for p in (tmp_path / "sn" / RECORDS).iterdir()) == [
        "0.attn.json",
        "0.mlp.json",
        "1.attn.json",
    ]
    assert sizes[2] - sizes[1] == sizes[1] - sizes[0] < 400  # the index grows by a few hundred bytes per gene
    partial = SupernetStore.open(tmp_path / "sn")
    assert [g.name for g in partial.genes()] == ["0.attn", "0.mlp", "1.attn"]
    assert partial.level_entries(partial.genes()[2]) == SupernetStore.open(directory).level_entries(
        partial.genes()[2]
    )

    _build(tmp_path / "sn", tiny_model("llama_gqa"), tokens, ladders)  # resumed: the rest, then the whole
    assert json.loads((tmp_path / "sn" / MANIFEST).read_text()) == whole
    assert not (tmp_path / "sn" / RECORDS).exists()


def test_a_supernet_of_the_previous_format_opens_and_resumes(built, tmp_path):
    """Format 1: the whole manifest, indented, no file sizes, no records."""
    directory, targets, tokens, ladders = built
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["format"] = 1
    for gene in manifest["genes"].values():
        for level in gene["levels"].values():
            del level["bytes"]
    (old / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    store, new = SupernetStore.open(old), SupernetStore.open(directory)
    gene = store.genes()[3]
    assert (
        store.level_entry(gene, 1).bytes is None
        and store.level_entry(gene, 1).sha256 == new.level_entry(gene, 1).sha256
    )
    assert torch.equal(store.variant(gene, 1).weight, new.variant(gene, 1).weight)
    assert store.verify() == sum(len(store.level_entries(g)) for g in store.genes()) - 1  # one was read
    resumed = SupernetStore.create_or_resume(old, _fingerprint(ladders))
    report = build_supernet(tiny_model("llama_gqa"), adapter_for(tiny_model("llama_gqa")), tokens,
                            BuildPlan(ladders, mlp_options=PrunerOptions(num_rounds=4), batch_size=3), resumed,
                            progress=False)  # fmt: skip
    assert report.genes_built == 0 and json.loads((old / MANIFEST).read_text())["format"] == 1  # untouched
