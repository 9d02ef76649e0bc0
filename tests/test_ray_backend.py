"""Ray fitness backend: same numbers (and I/O) as the serial evaluator, worker deaths survived, clear errors.

One real local Ray instance (2 CPUs) serves the whole module; the run directory comes from a real smoke run.
Fitness is evaluated in work units of `UNIT_SEQUENCES` sequences, so a batch of 8 sequences is 3 units (the last
one shorter) that several workers share.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import smoke_args
from tyr.cluster import RayEvaluator, RayWorkerPool, _worker_device
from tyr.config import RunConfig, from_dict, resolve_config, to_dict
from tyr.errors import TyrError
from tyr.search.batch import Batch
from tyr.search.evaluator import SerialEvaluator
from tyr.search.evolution import run_generation, sample_offspring
from tyr.search.scheduling import WorkQueue, assign, genome_distance, home_blocks, unit_blocks
from tyr.search.state import evolve, make_rng
from tyr.supernet.store import SupernetStore
from tyr.supernet.variant import Gene

REPO = Path(__file__).resolve().parents[1]
CPUS_PER_WORKER = 0.5  # logical: a 1-worker and a 2-worker evaluator fit together in num_cpus=2
UNIT_SEQUENCES = 3  # search.batch_size of the evaluators here (the smoke preset's 4 would give 2 even units)


@contextlib.contextmanager
def torch_threads(n: int):
    """Serial reference with the workers' thread count (float results may depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_run(tiny_assets, tmp_path_factory):
    """(run_dir, cfg) of a finished smoke run, with a local Ray instance up for the module."""
    ray = pytest.importorskip("ray")
    from tyr.cli import main
    from tyr.cluster import connect

    saved = {k: os.environ.pop(k, None) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a private local instance, never a cluster from the environment
    run_dir = tmp_path_factory.mktemp("ray-run") / "run"
    assert main(smoke_args(tiny_assets, run_dir)) == 0
    cfg = from_dict(RunConfig, yaml.safe_load((run_dir / "config.yaml").read_text()))
    cfg.search.batch_size = UNIT_SEQUENCES  # sequences per forward = per work unit, in both backends
    if ray.is_initialized():
        ray.shutdown()
    assert connect(None, num_cpus=2) is True
    yield run_dir, cfg
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class Reference:
    """The serial backend on a driver-side session: one SerialEvaluator at a time (they share the model)."""

    def __init__(self, run_dir: Path, cfg: RunConfig):
        from tyr import pipeline
        from tyr.evaluators.teacher import TeacherTargets
        from tyr.run import search_space

        self.cfg = cfg
        self.session = pipeline.open_session(cfg, progress=False)
        self.targets = TeacherTargets.open(run_dir / "teacher")
        self.stores = {it: SupernetStore.open(run_dir / f"iter-{it}" / "supernet") for it in (1, 2)}
        self.spaces = {it: search_space(self.session, store) for it, store in self.stores.items()}
        self.current: tuple[int, SerialEvaluator] | None = None

    def evaluator(self, iteration: int) -> SerialEvaluator:
        if self.current is None or self.current[0] != iteration:
            self.close()  # the model goes back to dense before another supernet is applied
            s = self.session
            evaluator = SerialEvaluator(
                s.model,
                s.adapter,
                self.stores[iteration],
                self.targets,
                s.calibration,
                mode=self.cfg.search.realisation,
                batch_size=self.cfg.search.batch_size,
            )
            self.current = (iteration, evaluator)
        return self.current[1]

    def values(self, iteration: int, genomes, indices) -> list[float]:
        with torch_threads(1):
            return self.evaluator(iteration)(genomes, indices)

    def close(self) -> None:
        if self.current is not None:
            self.current[1].close()
            self.current = None


@pytest.fixture(scope="module")
def reference(ray_run):
    ref = Reference(*ray_run)
    yield ref
    ref.close()


@pytest.fixture(scope="module")
def pool2(ray_run, tmp_path_factory):
    """A 2-worker pool shared by several tests, with the fault-injection file armed by tests that want it."""
    run_dir, cfg = ray_run
    faults = tmp_path_factory.mktemp("ray-fault")
    fault, hang = faults / "crash-now", faults / "hang-now"
    pool = RayWorkerPool(
        cfg, run_dir, 2, num_cpus_per_worker=CPUS_PER_WORKER, fault_file=str(fault), hang_file=str(hang)
    )
    pool.fault_path, pool.hang_path = fault, hang
    yield pool
    pool.close()


def _candidates(space, n: int, seed: int) -> list[tuple[int, ...]]:
    start = tuple(0 for _ in space.genes)
    return [start, *sample_offspring(start, space, np.random.default_rng(seed), n, 2)]


BATCHES = [Batch(range(8)), Batch((1, 4, 6)), Batch((0, 2)), Batch((1, 5), 20)]  # the last: 20-token prefixes


# -- unit: no Ray needed ---------------------------------------------------------------------------------------


def test_worker_device_follows_the_gpu_request():
    assert _worker_device("auto", 0) == "cpu"
    assert _worker_device("cuda:1", 0) == "cpu"
    assert _worker_device("auto", 1) == "cuda"
    assert _worker_device("cuda:3", 0.5) == "cuda"  # Ray remaps the visible devices
    with pytest.raises(TyrError):
        _worker_device("cpu", 1)


def test_chunks_follow_the_nearest_genome():
    unique = [(0, 0, 0, 0), (1, -1, 0, 0), (2, -2, 0, 0), (0, 0, 2, -1), (0, 0, 2, -2)]
    queue = WorkQueue(
        [*unique, unique[0]], unit_blocks(8, 8), max_attempts=2
    )  # a duplicate is evaluated once
    assert queue.unique == unique and queue.blocks == [(0, 8)]
    assert queue.chunk_size(num_workers=2, depth=2) == 2  # ceil(5 units / (2 x 2))
    chunk = queue.take_chunk(0, (0, 0, 2, -2), home=range(1), size=2)
    assert chunk == [(4, 0), (3, 0)]
    assert queue.pending == [(0, 0), (1, 0), (2, 0)]
    assert genome_distance(None, unique[0]) > genome_distance(unique[1], unique[2])


def test_blocks_and_home_ranges():
    assert unit_blocks(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert unit_blocks(1, 4) == [(0, 1)]
    assert [list(home_blocks(r, 3, 8)) for r in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert [list(home_blocks(r, 4, 2)) for r in range(4)] == [[0], [1], [0], [1]]  # workers share blocks
    assert list(home_blocks(5, 8, 1)) == [0]


class _Worker:
    def __init__(self, index):
        self.index, self.tail, self.in_flight = index, None, 0


def _drain(queue, workers, depth=2):
    """Run `assign` as the pool does, answering the oldest call first; returns the calls in dispatch order."""
    calls, open_calls = [], []
    while queue.pending or open_calls:
        new = assign(queue, workers, depth)
        calls += new
        open_calls += new
        worker, units = open_calls.pop(0)
        worker.in_flight -= 1
        queue.complete(
            units, [[float(sum(u)) + 0.5] * (queue.blocks[u[1]][1] - queue.blocks[u[1]][0]) for u in units]
        )
    return calls


def test_a_late_stage_spreads_each_candidate_over_all_workers():
    """2 candidates x 8 blocks on 4 workers: every worker gets each candidate's units of its own blocks (so
    reads only its share of the teacher rows), one candidate's units together in block order."""
    genomes = [(0, 1, 0, 0), (0, 0, 1, 0)]
    queue = WorkQueue(genomes, unit_blocks(16, 2), max_attempts=1)
    workers = [_Worker(i) for i in range(4)]
    calls = _drain(queue, workers)
    by_worker = {w.index: [u for v, units in calls if v is w for u in units] for w in workers}
    for rank, units in by_worker.items():
        home = list(home_blocks(rank, 4, 8))
        assert units == [(c, b) for c in (0, 1) for b in home]  # candidate-major, consecutive blocks
    # each sequence's sum is candidate + block + 0.5 (see _drain): (2 x (8c + 28) + 8) / 16 sequences
    assert queue.results(num_positions=1) == [4.0, 5.0]


def test_an_early_stage_gives_whole_candidates_in_nearest_order():
    """Many candidates on one block: the old whole-candidate scheduling (nearest-genome chains)."""
    genomes = [(i % 3, i // 3, 0) for i in range(9)]
    queue = WorkQueue(genomes, unit_blocks(1, 4), max_attempts=1)
    workers = [_Worker(i) for i in range(2)]
    first = assign(queue, workers, depth=2)
    assert [len(units) for _, units in first] == [3, 2, 1, 1]  # ceil(pending / (2 x 2)), shrinking
    assert first[0][1] == [(0, 0), (1, 0), (2, 0)]  # from an unknown genome: the lowest index, then nearest


def test_work_queue_requeues_then_gives_up_and_keeps_call_order():
    queue = WorkQueue([(1, 0), (0, 1), (1, 0)], unit_blocks(3, 2), max_attempts=2)
    chunk = queue.take_chunk(7, None, home=range(2), size=4)
    assert chunk == [(0, 0), (0, 1), (1, 0), (1, 1)] and queue.held[7] == {0, 1}
    queue.requeue(chunk, worker=7)  # the worker died once: the units go back, its rows are gone
    assert queue.pending == [(0, 0), (0, 1), (1, 0), (1, 1)] and 7 not in queue.held
    chunk = queue.take_chunk(7, None, home=range(2), size=4)
    queue.complete(chunk, [[0.25, 0.5], [1.0], [0.5, 0.25], [0.0]])
    with pytest.raises(RuntimeError, match="sums for"):
        queue.complete([(0, 1)], [[1.0, 2.0]])
    assert queue.results(num_positions=2) == [1.75 / 6, 0.75 / 6, 1.75 / 6]
    with pytest.raises(TyrError, match="crashed a worker"):
        queue.requeue([(0, 0)])
        queue.requeue([(0, 0)])


# -- Ray: equal results ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_worker_matches_serial_values_and_search(ray_run, reference, tmp_path):
    run_dir, cfg = ray_run
    evaluator = RayEvaluator(
        cfg, run_dir, run_dir / "iter-1" / "supernet", num_workers=1, num_cpus_per_worker=CPUS_PER_WORKER
    )
    try:
        _assert_same_io(cfg, run_dir, reference, evaluator, tmp_path)  # first: a fresh worker
        space = reference.spaces[1]
        genomes = _candidates(space, 8, seed=1)
        for indices in BATCHES:
            assert evaluator(genomes, indices) == reference.values(1, genomes, indices)
        assert evaluator.stats.workers[0]["threads"] == 1
        _assert_same_search(cfg, reference, evaluator, tmp_path)
    finally:
        evaluator.close()


@pytest.mark.slow
def test_two_workers_match_serial_values_and_search(ray_run, reference, pool2, tmp_path):
    run_dir, cfg = ray_run
    evaluator = RayEvaluator(cfg, run_dir, run_dir / "iter-1" / "supernet", pool=pool2)
    space = reference.spaces[1]
    genomes = _candidates(space, 12, seed=2)
    doubled = genomes + genomes[::-1]  # duplicates are evaluated once and returned in candidate order
    for indices in BATCHES:
        want = reference.values(1, genomes, indices)
        assert evaluator(doubled, indices) == want + want[::-1]
    assert len({w["pid"] for w in evaluator.stats.workers}) == 2
    _assert_same_search(cfg, reference, evaluator, tmp_path)
    evaluator.close()  # a shared pool stays up
    assert all(slot.actor is not None for slot in pool2.slots)


@pytest.mark.slow
def test_three_workers_share_candidates_units_and_survive_a_death_mid_unit(ray_run, reference, tmp_path):
    """A late stage (2 candidates x 3 units) spread over 3 workers, and an early one (10 candidates): the
    serial bits, also when a worker SIGKILLs itself mid-unit (its genome applied, nothing scored)."""
    run_dir, cfg = ray_run
    fault = tmp_path / "crash-now"
    pool = RayWorkerPool(cfg, run_dir, 3, num_cpus_per_worker=0.25, fault_file=str(fault))
    try:
        evaluator = RayEvaluator(cfg, run_dir, run_dir / "iter-1" / "supernet", pool=pool)
        space = reference.spaces[1]
        late, early = _candidates(space, 1, seed=5), _candidates(space, 9, seed=6)
        for genomes in (late, early):
            for batch in BATCHES:
                assert evaluator(genomes, batch) == reference.values(1, genomes, batch)
        assert pool.stats.units == sum(
            len(g) * len(unit_blocks(len(b.sequences), UNIT_SEQUENCES))
            for g in (late, early)
            for b in BATCHES
        )
        fault.touch()
        assert evaluator(late, BATCHES[0]) == reference.values(1, late, BATCHES[0])
        assert not fault.exists() and pool.stats.failures == 1 and pool.stats.restarts == 1
        assert len({w["pid"] for w in pool.stats.workers}) == 3
    finally:
        pool.close()


def _history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_io(cfg, run_dir, reference, ray_fitness, tmp_path):
    """One fresh worker moves exactly what a fresh serial evaluator does, generation by generation: the
    same variant bytes, teacher bytes and swaps (same nearest-genome order), and no hashing (the driver's
    build verified the files; here: `verify` first)."""
    from tyr.run import evolution_config

    reference.close()  # the serial evaluator below gets the dense model
    store = SupernetStore.open(run_dir / "iter-1" / "supernet")
    store.verify()
    s = reference.session
    serial = SerialEvaluator(
        s.model, s.adapter, store, reference.targets, s.calibration, mode=cfg.search.realisation,
        batch_size=cfg.search.batch_size,
    )  # fmt: skip
    space, evo = reference.spaces[1], evolution_config(cfg, 3)
    shape = {"num_sequences": reference.targets.num_sequences, "seq_len": reference.targets.seq_len}

    def search(fitness, name):
        d = tmp_path / f"io-{name}"
        evolve(space, evo, fitness, (0,) * len(space.genes), seed=3, state_path=d / "state.json",
               history_path=d / "h.jsonl", identity={}, **shape)  # fmt: skip
        return [(h["parent"], h["io"]) for h in _history(d / "h.jsonl")]

    with torch_threads(1):
        want = search(serial, "serial")
    serial.close()
    got = search(ray_fitness, "ray")
    assert got == want
    assert all(io["num_variant_files_hashed"] == 0 and io["num_genes_swapped"] > 0 for _, io in got)
    assert want[0][1]["variant_bytes_read"] > 0 and want[0][1]["teacher_bytes_read"] > 0


def _assert_same_search(cfg, reference, ray_fitness, tmp_path):
    from tyr.run import evolution_config

    serial, space, targets = reference.evaluator(1), reference.spaces[1], reference.targets
    evo = evolution_config(cfg, 3)
    start = tuple(0 for _ in space.genes)
    shape = {"num_sequences": targets.num_sequences, "seq_len": targets.seq_len}

    def one_generation(fitness):
        return run_generation(start, space, evo, fitness, make_rng(7), **shape)

    with torch_threads(1):
        want_gen = one_generation(serial)
    got_gen = one_generation(ray_fitness)
    assert (got_gen.parent, got_gen.fitness, got_gen.stage_best) == (
        want_gen.parent,
        want_gen.fitness,
        want_gen.stage_best,
    )

    def search(fitness, name):
        d = tmp_path / name
        return evolve(
            space, evo, fitness, start, seed=11, state_path=d / "state.json", history_path=d / "h.jsonl",
            identity={"test": name}, **shape,
        )  # fmt: skip

    with torch_threads(1):
        want = search(serial, "serial")
    got = search(ray_fitness, "ray")
    assert got.generation == want.generation == 3
    assert (got.parent, got.parent_fitness, got.best_history) == (
        want.parent,
        want.parent_fitness,
        want.best_history,
    )
    # the workers' counters, summed: nothing hashed (the driver verified), every batch's rows read by at
    # least one worker and at most once per worker
    ray_io = [h["io"] for h in _history(tmp_path / "ray" / "h.jsonl")]
    serial_io = [h["io"] for h in _history(tmp_path / "serial" / "h.jsonl")]
    num_workers = len(ray_fitness.stats.workers)
    for got_io, want_io in zip(ray_io, serial_io, strict=True):
        assert got_io["num_variant_files_hashed"] == want_io["num_variant_files_hashed"] == 0
        assert want_io["teacher_bytes_read"] <= got_io["teacher_bytes_read"]
        assert got_io["teacher_bytes_read"] <= num_workers * want_io["teacher_bytes_read"]


@pytest.mark.slow
def test_shared_pool_switches_supernets(ray_run, reference, pool2):
    """The factory's pattern: one pool, one evaluator per iteration's supernet (model loaded once per actor)."""
    run_dir, cfg = ray_run
    pids = {w["pid"] for w in pool2.stats.workers}
    for it in (2, 1, 2):
        evaluator = RayEvaluator(cfg, run_dir, run_dir / f"iter-{it}" / "supernet", pool=pool2)
        genomes = _candidates(reference.spaces[it], 6, seed=it)
        assert evaluator(genomes, BATCHES[1]) == reference.values(it, genomes, BATCHES[1])
        evaluator.close()
    assert {w["pid"] for w in pool2.stats.workers} == pids  # no actor was restarted


@pytest.mark.slow
def test_factory_keeps_one_pool_for_the_run(ray_run, reference):
    """What `tyr run` wires in: factory(supernet_dir) per iteration, close() at the end of the run."""
    import ray

    from tyr.cluster import ray_evaluator_factory

    run_dir, cfg = ray_run
    cfg = from_dict(RunConfig, to_dict(cfg))
    cfg.backend.num_workers, cfg.backend.num_cpus_per_worker = 1, CPUS_PER_WORKER
    factory = ray_evaluator_factory(cfg, run_dir)
    try:
        pids = set()
        for it in (1, 2):
            fitness = factory(run_dir / f"iter-{it}" / "supernet")
            genomes = _candidates(reference.spaces[it], 4, seed=10 + it)
            assert fitness(genomes, BATCHES[0]) == reference.values(it, genomes, BATCHES[0])
            assert fitness.num_evaluations == len(genomes)
            pids |= {w["pid"] for w in fitness.stats.workers}
            fitness.close()
        assert len(pids) == 1  # the worker loaded the model once for both iterations
        pool = factory.pool
    finally:
        factory.close()
    assert factory.pool is None and all(slot.actor is None for slot in pool.slots)
    assert ray.is_initialized()  # a Ray instance the factory did not start is left running


@pytest.mark.slow
def test_whole_run_on_ray_gives_the_serial_architecture(ray_run, tiny_assets, tmp_path):
    """Acceptance: `tyr run --workers 2` ends with the serial run's architecture (the same seed)."""
    import json

    from tyr.cli import main

    serial_dir, _ = ray_run
    out = tmp_path / "run-on-ray"
    extra = ("--workers", "2", "--set", f"backend.num_cpus_per_worker={CPUS_PER_WORKER}")
    assert main(smoke_args(tiny_assets, out, *extra)) == 0
    # The backend is not part of the run's identity: the Ray run and the serial run share config.yaml.
    assert (out / "config.yaml").read_text() == (serial_dir / "config.yaml").read_text()

    def read(run, rel):
        return json.loads((run / rel).read_text())

    assert read(out, "final/architecture.json") == read(serial_dir, "final/architecture.json")
    # the teacher passes ran on the workers (blocks of search.batch_size sequences): the serial run's bytes
    assert read(out, "teacher/meta.json") == read(serial_dir, "teacher/meta.json")
    assert read(out, "teacher-validation/meta.json") == read(serial_dir, "teacher-validation/meta.json")
    # the final metrics were measured on a worker: the serial run's numbers
    got, want = read(out, "final/metrics.json"), read(serial_dir, "final/metrics.json")
    for name in ("dense", "uniform", "searched"):
        assert got[name]["ppl"] == pytest.approx(want[name]["ppl"], rel=1e-5), name
        assert got[name]["kl"] == pytest.approx(want[name]["kl"], rel=1e-4, abs=1e-7), name
    # the supernets were built on the workers, one shard of the calibration sequences each
    for it in (1, 2):
        ledger = read(out, f"iter-{it}/supernet/build.json")
        assert ledger["backend"] == "ray" and len(ledger["shards"]) == 2
    for it in (1, 2):
        got, want = read(out, f"iter-{it}/result.json"), read(serial_dir, f"iter-{it}/result.json")
        assert got["genome"] == want["genome"] and got["centres"] == want["centres"]
        if want["fitness"] is None:  # the start won on validation: no search fitness
            assert got["fitness"] is None
        else:
            assert got["fitness"] == pytest.approx(want["fitness"], rel=1e-6)  # serial ran with 2 threads
        # validation KL scored on the workers (stacked rows N.., as the serial backend stacks them)
        assert got["validation_kl"] == pytest.approx(want["validation_kl"], rel=1e-6)
        # every history line carries the generation's I/O, summed over the workers; no file is hashed
        # during a search in either backend (the build verified every file)
        for run in (out, serial_dir):
            ios = [h["io"] for h in _history(run / f"iter-{it}" / "search" / "history.jsonl")]
            assert ios and all(
                io["num_variant_files_hashed"] == 0 and io["num_genes_swapped"] > 0 for io in ios
            )


def test_a_cpu_driver_runs_on_ray_in_the_workers_dtype(ray_run, tiny_assets, tmp_path):
    """backend.driver_device=cpu: the driver keeps the model in host RAM in the dtype GPU workers use (auto:
    bfloat16) and ships it to the workers, so the supernets' fingerprint and the workers' weights agree."""
    import json

    from tyr.cli import main

    out = tmp_path / "cpu-driver"
    extra = (
        "--workers",
        "2",
        "--set",
        f"backend.num_cpus_per_worker={CPUS_PER_WORKER}",
        "--set",
        "backend.driver_device=cpu",
    )
    assert main(smoke_args(tiny_assets, out, *extra)) == 0
    manifest = json.loads((out / "iter-1" / "supernet" / "manifest.json").read_text())
    assert manifest["fingerprint"]["dtype"] == "torch.bfloat16"
    variant = SupernetStore.open(out / "iter-1" / "supernet").variant(Gene(0, "mlp"), 0)
    assert variant.weight.dtype == torch.bfloat16  # written in the driver's dtype from the workers' pruning
    assert json.loads((out / "final" / "metrics.json").read_text())["searched"]["ppl"] > 0


def test_driver_placement_is_the_gpu_workers_dtype_on_the_cpu():
    from tyr.pipeline import driver_placement

    cfg = resolve_config(None, ["backend.kind=ray", "backend.driver_device=cpu"])
    assert driver_placement(cfg) == (torch.device("cpu"), torch.bfloat16)
    cfg = resolve_config(None, ["backend.kind=ray", "backend.driver_device=cpu", "model.dtype=float32"])
    assert driver_placement(cfg) == (torch.device("cpu"), torch.float32)
    assert driver_placement(resolve_config(None, ["backend.kind=ray"])) is None
    assert driver_placement(resolve_config(None, ["backend.driver_device=cpu"])) is None  # serial: no driver
    with pytest.raises(TyrError, match="driver_device"):
        resolve_config(None, ["backend.driver_device=gpu"])


# -- Ray: fault tolerance ----------------------------------------------------------------------------------------


def test_a_worker_killed_mid_build_replays_its_shard_and_keeps_the_serial_units(
    ray_run, reference, pool2, tmp_path, monkeypatch
):
    """The data-parallel build with a worker SIGKILLed at the capture of block 1: its replacement embeds its
    shard and replays block 0 from the store; every gene keeps the serial build's units (tyr/cluster_build.py)."""
    from tyr import pipeline
    from tyr.cluster_build import RayShards, build_on_workers
    from tyr.supernet.variant import genes_of

    run_dir, cfg = ray_run
    serial = SupernetStore.open(run_dir / "iter-1" / "supernet")
    adapter = reference.session.adapter
    plan = pipeline.build_plan(cfg, [serial.ladder(g) for g in genes_of(adapter.num_layers)])
    capture = RayShards.capture

    def arming(self, gene):
        if gene == Gene(1, "attn"):
            pool2.fault_path.touch()  # the next worker call SIGKILLs its actor
        return capture(self, gene)

    monkeypatch.setattr(RayShards, "capture", arming)
    store = SupernetStore.create_or_resume(tmp_path / "supernet", serial.fingerprint)
    failures = pool2.stats.failures
    report = build_on_workers(
        pool2, adapter, reference.session.calibration.shape[0], plan, store, progress=False
    )
    assert pool2.stats.failures == failures + 1 and not pool2.fault_path.exists()
    assert report.genes_built == 2 * adapter.num_layers and len(report.ledger["shards"]) >= 1
    for gene in genes_of(adapter.num_layers):
        for level in serial.ladder(gene).levels:
            a, b = serial.variant(gene, level), store.variant(gene, level)
            assert torch.equal(a.kept, b.kept), (gene.name, level)
            torch.testing.assert_close(b.weight.float(), a.weight.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.slow
def test_worker_killed_mid_call_gives_the_same_results(ray_run, reference, pool2):
    run_dir, cfg = ray_run
    evaluator = RayEvaluator(cfg, run_dir, run_dir / "iter-1" / "supernet", pool=pool2)
    genomes = _candidates(reference.spaces[1], 12, seed=3)
    want = reference.values(1, genomes, BATCHES[0])
    failures, restarts = pool2.stats.failures, pool2.stats.restarts
    pool2.fault_path.touch()  # the first worker to reach its second genome SIGKILLs its own process
    assert evaluator(genomes, BATCHES[0]) == want
    assert not pool2.fault_path.exists()
    assert pool2.stats.failures == failures + 1
    assert pool2.stats.restarts == restarts + 1
    assert evaluator(genomes, BATCHES[1]) == reference.values(1, genomes, BATCHES[1])


@pytest.mark.slow
def test_worker_killed_between_calls_is_replaced(ray_run, reference, pool2):
    """os.kill of one actor's process and ray.kill of the other: both are replaced, results unchanged."""
    ray = pytest.importorskip("ray")
    run_dir, cfg = ray_run
    evaluator = RayEvaluator(cfg, run_dir, run_dir / "iter-1" / "supernet", pool=pool2)
    genomes = _candidates(reference.spaces[1], 10, seed=4)
    want = reference.values(1, genomes, BATCHES[2])
    assert evaluator(genomes, BATCHES[2]) == want
    restarts = pool2.stats.restarts
    os.kill(pool2.slots[0].info["pid"], signal.SIGKILL)
    ray.kill(pool2.slots[1].actor, no_restart=False)
    time.sleep(0.5)
    assert evaluator(genomes, BATCHES[2]) == want
    assert pool2.stats.restarts == restarts + 2


@pytest.mark.slow
def test_a_hung_worker_is_replaced_and_its_units_rerun(ray_run, reference, pool2):
    """A worker that sleeps forever mid-call (a hung GPU or NFS read) is killed after backend.call_timeout_s
    (20 s) and replaced; the call ends with the serial values."""
    run_dir, cfg = ray_run
    evaluator = RayEvaluator(cfg, run_dir, run_dir / "iter-1" / "supernet", pool=pool2)
    genomes = _candidates(reference.spaces[1], 6, seed=8)
    want = reference.values(1, genomes, BATCHES[0])
    failures, restarts = pool2.stats.failures, pool2.stats.restarts
    pool2.call_timeout_s = 20.0
    try:
        pool2.hang_path.touch()
        t0 = time.monotonic()
        assert evaluator(genomes, BATCHES[0]) == want
        assert time.monotonic() - t0 >= 20.0
    finally:
        pool2.call_timeout_s = None
    assert not pool2.hang_path.exists()
    assert (pool2.stats.failures, pool2.stats.restarts) == (failures + 1, restarts + 1)
    assert evaluator(genomes, BATCHES[1]) == reference.values(1, genomes, BATCHES[1])


def test_teacher_rows_on_workers_are_the_serial_bytes_with_a_worker_killed(
    ray_run, reference, pool2, tmp_path
):
    """The data-parallel teacher pass: workers compute blocks of search.batch_size sequences and write them into
    the driver's targets file; the bytes are the serial pass's (same blocks, one thread), also when a worker is
    SIGKILLed in its task (the block runs again elsewhere)."""
    from tyr.evaluators.teacher import compute_and_save_teacher_targets

    run_dir, cfg = ray_run
    reference.close()  # the model back to dense: earlier tests left a candidate applied
    s = reference.session
    k, bs = cfg.search.topk, cfg.search.batch_size
    with torch_threads(1):
        serial = compute_and_save_teacher_targets(
            s.model, s.calibration, k, tmp_path / "serial", batch_size=bs
        )
    pool2.fault_path.touch()
    failures = pool2.stats.failures

    def fill(layout, blocks):
        assert len(blocks) > 2  # several tasks, spread over both workers
        pool2.map("teacher_rows", [(layout, a, b) for a, b in blocks])

    on_ray = compute_and_save_teacher_targets(
        s.model, s.calibration, k, tmp_path / "ray", batch_size=bs, fill=fill
    )
    assert not pool2.fault_path.exists() and pool2.stats.failures == failures + 1  # the fault fired
    assert (tmp_path / "ray" / "targets.safetensors").read_bytes() == (
        tmp_path / "serial" / "targets.safetensors"
    ).read_bytes()
    assert on_ray.meta == serial.meta


# -- Ray: configuration errors ---------------------------------------------------------------------------------------


def test_gpus_per_worker_auto_and_an_explicit_zero_on_a_gpu_cluster():
    from tyr.cluster import resolve_gpus_per_worker

    assert resolve_gpus_per_worker("auto", 8) == 1.0
    assert resolve_gpus_per_worker("auto", 0) == 0.0
    assert resolve_gpus_per_worker(4, 8) == 4.0
    assert resolve_gpus_per_worker(0, 0) == 0.0
    with pytest.raises(TyrError, match="allow_cpu_workers=true"):
        resolve_gpus_per_worker(0, 8)
    assert resolve_gpus_per_worker(0, 8, allow_cpu_workers=True) == 0.0
    assert RunConfig().backend.num_gpus_per_worker == "auto"
    for bad, message in [
        ("backend.num_gpus_per_worker=many", "num_gpus_per_worker must be"),
        ("backend.call_timeout_s=0", "call_timeout_s must be > 0"),
        ("backend.startup_timeout_s=-1", "startup_timeout_s must be > 0"),
    ]:
        with pytest.raises(TyrError, match=message):
            resolve_config(None, [bad])


def test_workers_must_fit_on_one_node():
    from tyr.cluster import workers_that_fit

    two_gpu_nodes = [{"Alive": True, "Resources": {"CPU": 32.0, "GPU": 2.0}}] * 4
    assert workers_that_fit(two_gpu_nodes, 1, 4) == 0  # 8 GPUs in all, but no node holds a 4-GPU worker
    assert workers_that_fit(two_gpu_nodes, 1, 2) == 4
    assert workers_that_fit(two_gpu_nodes, 1, 0.5) == 16
    assert workers_that_fit(two_gpu_nodes, 12, 1) == 8  # CPUs bind: 2 per node
    dead = [{"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    assert workers_that_fit(dead + two_gpu_nodes[:1], 1, 1) == 2
    assert workers_that_fit(two_gpu_nodes, 0, 0) >= 1 << 20


def test_only_hub_and_tyr_variables_reach_the_actors():
    from tyr.cluster import forwarded_environment

    env = {"HF_TOKEN": "t", "HF_HOME": "/cache", "TYR_X": "1", "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}
    assert forwarded_environment(env) == {"HF_TOKEN": "t", "HF_HOME": "/cache", "TYR_X": "1"}


def test_a_replacement_that_is_never_placed_is_retired(monkeypatch):
    """The evaluate loop's deadline for set-ups (the replacement of a dead actor that no node can take): the slot
    is retired after startup_timeout_s; with none left the call fails with a clear error, never waits forever."""
    from tyr import cluster
    from tyr.cluster import ActorPool, _Slot

    class FakeRay:
        killed = []

        @classmethod
        def kill(cls, actor, no_restart=True):
            cls.killed.append(actor)

    monkeypatch.setattr(cluster, "_ray", lambda: FakeRay)
    pool = ActorPool.__new__(ActorPool)
    pool.startup_timeout_s, pool._last_error = 5.0, "ActorDiedError"
    now = time.monotonic()
    waiting, fresh = _Slot(0, actor="a0", setup_since=now - 10), _Slot(1, actor="a1", setup_since=now)
    pool.slots = [waiting, fresh]
    setups = {"ref0": (waiting, waiting.generation), "ref1": (fresh, fresh.generation)}
    pool._give_up_unplaced(setups)
    assert waiting.retired and not fresh.retired and list(setups) == ["ref1"] and FakeRay.killed == ["a0"]
    pool._check_not_all_retired()  # one worker left: the call goes on
    fresh.setup_since = now - 10
    pool._give_up_unplaced(setups)
    with pytest.raises(TyrError, match="every Ray worker"):
        pool._check_not_all_retired()


@pytest.mark.slow
def test_too_many_workers_for_the_cluster_is_refused(ray_run):
    run_dir, cfg = ray_run
    with pytest.raises(TyrError, match="too small"):
        RayWorkerPool(cfg, run_dir, 3, num_cpus_per_worker=1)
    with pytest.raises(TyrError, match="num_workers"):
        RayWorkerPool(cfg, run_dir, 0)
    with pytest.raises(TyrError, match="whole number"):
        RayWorkerPool(cfg, run_dir, 1, num_gpus_per_worker=1.5)
    with pytest.raises(TyrError, match="not a run directory"):
        RayWorkerPool(cfg, run_dir / "iter-1", 1)


@pytest.mark.slow
def test_unreachable_address_fails_fast():
    pytest.importorskip("ray")
    script = textwrap.dedent(
        """
        import sys, time
        from tyr.cluster import connect
        from tyr.errors import TyrError
        for address in sys.argv[1:]:
            t0 = time.monotonic()
            try:
                connect(address, verbose=False)
            except TyrError as e:
                print(f"TyrError {time.monotonic() - t0:.1f} {e}")
            else:
                print("connected")
        """
    )
    addresses = ["ray://127.0.0.1:1", "127.0.0.1:1", "no-such-host.invalid:6379", "not an address"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script, *addresses],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(addresses), proc.stdout + proc.stderr
    for line in lines:
        assert line.startswith("TyrError"), line
        assert float(line.split()[1]) < 30
    assert "cannot reach the Ray cluster at ray://127.0.0.1:1" in lines[0]
    assert time.monotonic() - t0 < 60
