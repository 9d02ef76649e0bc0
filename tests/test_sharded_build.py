"""The data-parallel supernet build (tyr/cluster_build.py) against the serial build, in this process.

`InProcessPool` stands in for the Ray pool (tests/test_ray_backend.py runs the real one): worker k holds shard k
and runs the same `ShardHost` code an actor runs. Ground truth is the serial build (`build_supernet`): one shard
gives its bytes; more shards give every gene's H within float32 rounding (rtol 1e-6) and the same kept units.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import torch

from tests.test_builder import _plan  # chunks of 2 sequences
from tests.tiny import random_tokens, tiny_model
from tyr.cluster_build import RayShards, ShardHost, level_groups, shard_bounds
from tyr.supernet.builder import LocalShards, Offload, build_supernet, drive_build
from tyr.supernet.families import adapter_for
from tyr.supernet.store import SupernetStore

NUM_SEQUENCES = 6  # three chunks of 2 (tests.test_builder._plan): shards of 1+2 chunks (2 workers) or 1+1+1


class InProcessPool:
    """What `RayShards` needs of `tyr.cluster.ActorPool`, run in this process: shard k on worker k mod n, other
    tasks on workers 0, 1, ... (method `build_x` is `ShardHost.x`, as `tyr.cluster._Worker` delegates it);
    `replace_after` = {shard call number: worker}: that worker is replaced by a fresh one (its shards lost)
    before the call, as the pool replaces a dead actor."""

    def __init__(self, make_host, num_workers: int, replace_after: dict[int, int] | None = None):
        self.make_host, self.num_workers = make_host, num_workers
        self.hosts = [make_host() for _ in range(num_workers)]
        self.replace_after = dict(replace_after or {})
        self.calls = 0

    def _run(self, host, method: str, args: tuple, keep: bool):
        result = getattr(host, method.removeprefix("build_"))(*args)
        return result[1] if keep else result  # keep: the large value (a reference, on Ray)

    def on_shards(self, method: str, calls: list[tuple], keep: bool = False) -> list:
        self.calls += 1
        if self.calls in self.replace_after:
            self.hosts[self.replace_after[self.calls]] = self.make_host()
        return [self._run(self.hosts[k % self.num_workers], method, c, keep) for k, c in enumerate(calls)]

    def map(self, method: str, tasks: list[tuple], keep: bool = False) -> list:
        return [self._run(self.hosts[i % self.num_workers], method, t, keep) for i, t in enumerate(tasks)]


@pytest.fixture(scope="module")
def setting():
    model = tiny_model("llama_gqa", num_layers=3)
    adapter = adapter_for(model)
    return model, adapter, random_tokens(NUM_SEQUENCES, 16), _plan(adapter)


def _host(setting):
    model, adapter, tokens, plan = setting
    return lambda: ShardHost(model, adapter, tokens, plan, lambda: Offload("host"))


def _serial(directory: Path, setting, hessians: dict | None = None) -> SupernetStore:
    model, adapter, tokens, plan = setting
    store = SupernetStore.create_or_resume(directory, {"test": 1})
    build_supernet(model, adapter, tokens, plan, store, progress=False, offload=Offload("host"))
    return store


def _sharded(directory: Path, setting, pool: InProcessPool) -> SupernetStore:
    _, adapter, tokens, plan = setting
    store = SupernetStore.create_or_resume(directory, {"test": 1})
    shards = RayShards(pool, adapter, store, tokens.shape[0], plan.batch_size)
    with torch.inference_mode():
        drive_build(adapter, plan, store, shards, progress=False)
    shards.close()
    return store


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.safetensors"))
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*.safetensors")) and names
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def test_shards_and_level_groups():
    assert shard_bounds(6, 2, 2) == [(0, 2), (2, 6)]
    assert shard_bounds(6, 2, 8) == [(0, 2), (2, 4), (4, 6)]  # never an empty shard
    assert shard_bounds(7, 2, 3) == [(0, 2), (2, 4), (4, 7)]  # whole chunks; the last one shorter
    assert level_groups(5, 2) == [[0, 2, 4], [1, 3]] and level_groups(3, 8) == [[0], [1], [2]]


def test_one_worker_builds_the_serial_bytes(tmp_path, setting):
    _serial(tmp_path / "serial", setting)
    _sharded(tmp_path / "one", setting, InProcessPool(_host(setting), 1))
    assert _same_files(tmp_path / "serial", tmp_path / "one")


@pytest.mark.parametrize("num_workers", [2, 3])
def test_more_workers_sum_h_within_rounding_and_keep_the_same_units(
    tmp_path, setting, monkeypatch, num_workers
):
    seen: dict[str, list] = {"serial": [], "sharded": []}
    local_capture, sharded_capture = LocalShards.capture, RayShards.capture

    def record(kind, capture):
        def wrapped(self, gene):
            stats = capture(
                self, gene
            )  # serial: InputStats; sharded: the tree's sum (arrays, on Ray a reference)
            h, total, count = (
                (stats.hessian, stats.total, stats.count)
                if kind == "serial"
                else (torch.as_tensor(stats["hessian"]), torch.as_tensor(stats["total"]), stats["count"])
            )
            seen[kind].append((gene, h.detach().cpu().clone(), total.cpu().clone(), count))
            return stats

        return wrapped

    monkeypatch.setattr(LocalShards, "capture", record("serial", local_capture))
    monkeypatch.setattr(RayShards, "capture", record("sharded", sharded_capture))
    serial = _serial(tmp_path / "serial", setting)
    sharded = _sharded(tmp_path / "sharded", setting, InProcessPool(_host(setting), num_workers))
    assert len(seen["serial"]) == len(seen["sharded"]) == 6
    for (gene, h, total, count), (gene2, h2, total2, count2) in zip(
        seen["serial"], seen["sharded"], strict=True
    ):
        assert gene == gene2 and count == count2
        torch.testing.assert_close(h2, h, rtol=1e-6, atol=1e-6 * float(h.abs().max()))
        # later genes' inputs carry the upstream genes' rounding (their pruned weights differ in the last bits)
        torch.testing.assert_close(total2, total, rtol=1e-6, atol=1e-6 * float(total.abs().max()))
    _, _, _, plan = setting
    for ladder in plan.ladders:
        for level in ladder.levels:
            a, b = serial.variant(ladder.gene, level), sharded.variant(ladder.gene, level)
            assert torch.equal(a.kept, b.kept), (ladder.gene.name, level)
            torch.testing.assert_close(b.weight, a.weight, rtol=1e-3, atol=1e-4)


def test_a_worker_replaced_mid_build_rebuilds_its_shard_with_the_same_result(tmp_path, setting):
    reference = _sharded(tmp_path / "uninterrupted", setting, InProcessPool(_host(setting), 2))
    del reference
    # call 6 is the capture of gene 1.mlp (calls alternate capture/propagate): worker 1 (shard 1) replays
    # 3 genes from the store first; call 9 replaces worker 0 before a propagate (its captured inputs are lost)
    pool = InProcessPool(_host(setting), 2, replace_after={6: 1, 9: 0})
    _sharded(tmp_path / "replaced", setting, pool)
    assert _same_files(tmp_path / "uninterrupted", tmp_path / "replaced")


def test_a_resumed_sharded_build_gives_the_uninterrupted_bytes(tmp_path, setting, monkeypatch):
    _sharded(tmp_path / "uninterrupted", setting, InProcessPool(_host(setting), 2))
    directory = tmp_path / "resumed"
    record = SupernetStore.record_gene
    recorded = []

    def dying(store, *args, **kwargs):
        if len(recorded) == 3:
            raise KeyboardInterrupt  # the driver stops after recording three genes (the 4th's files written)
        recorded.append(record(store, *args, **kwargs))

    monkeypatch.setattr(SupernetStore, "record_gene", dying)
    with pytest.raises(KeyboardInterrupt):
        _sharded(directory, setting, InProcessPool(_host(setting), 2))
    monkeypatch.setattr(SupernetStore, "record_gene", record)
    _sharded(directory, setting, InProcessPool(_host(setting), 2))  # fresh workers: the first 3 genes reused
    assert _same_files(tmp_path / "uninterrupted", directory)
