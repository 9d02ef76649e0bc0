"""The data-parallel supernet build on the run's Ray workers (`backend.kind: ray`).

The calibration sequences are split into shards, contiguous ranges of whole chunks of `supernet.batch_size`
sequences (so every chunk is the serial build's chunk); worker k holds shard k's hidden states
(`tyr.supernet.builder.BuildShard`) for the whole build. Per gene, `supernet.builder.drive_build` on the driver
runs the same three steps as the serial build, here spread over the workers:

1. capture: every worker computes its shard's input statistics (H = Σ XᵀX in float32, Σ X in float64, the token
   count); the driver adds them in shard order. One worker gives the serial build's bits; more workers give H
   within float32 rounding of it (the chunks' sums are grouped differently), tested within rtol 1e-6.
2. prune: the gene's levels are independent given H, so they are split over the workers (level i to group
   i mod G) and each group is pruned on a worker's device; the driver writes the variants to the store.
3. propagate: every worker reads the gene's variants from the store (on storage shared by every node) and adds
   their expected output to its shard.

The driver holds no model tensors on a device: H and the variants pass through its host memory only.

Every step is self-contained: it names the shard, its sequences and how many genes the driver has propagated
before it. A worker that lacks the shard (a replacement for a dead or hung worker, or a worker taking over the
shard of a retired one) embeds the shard's sequences and replays the propagation of the finished genes from the
store first, so any step can be retried on any worker and the build's result does not change.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tyr.supernet.builder import BuildPlan, BuildReport, BuildShard, Offload, drive_build, prune_gene
from tyr.supernet.criteria import InputStats, LevelResult
from tyr.supernet.ladder import Ladder
from tyr.supernet.ledger import DeviceLedger
from tyr.supernet.store import SupernetStore
from tyr.supernet.variant import Gene, Variant, genes_of

if TYPE_CHECKING:
    from tyr.cluster import ActorPool

logger = logging.getLogger(__name__)


def shard_bounds(num_sequences: int, batch_size: int, num_workers: int) -> list[tuple[int, int]]:
    """Contiguous ranges of whole chunks of `batch_size` sequences, as even as possible over at most
    `num_workers` shards (never an empty one)."""
    num_chunks = -(-num_sequences // batch_size)
    shards = min(num_workers, num_chunks)
    bounds = []
    for k in range(shards):
        first, last = k * num_chunks // shards, (k + 1) * num_chunks // shards
        bounds.append((first * batch_size, min(last * batch_size, num_sequences)))
    return bounds


def level_groups(num_levels: int, num_workers: int) -> list[list[int]]:
    """Level indices pruned together on one worker: level i in group i mod G (the costs of neighbouring levels
    differ least, so interleaving balances the groups)."""
    groups = min(num_levels, num_workers)
    return [list(range(g, num_levels, groups)) for g in range(groups)]


# -- the worker side -------------------------------------------------------------------------------------------


@dataclass
class _HeldShard:
    supernet: tuple[str, str]  # (directory, fingerprint hash) of the supernet being built
    shard: BuildShard
    ledger: DeviceLedger
    bounds: tuple[int, int]
    done: int = 0  # genes propagated into this shard
    captured: Gene | None = None  # the gene captured last, not yet propagated (its ledger record is open)


class ShardHost:
    """The shards of supernet builds a worker holds (inside its actor), over its model and calibration tokens.

    `plan` gives the accumulation, pruner options and chunk size (its ladders are unused: the store has them);
    `offload` makes each new shard's `Offload`.
    """

    def __init__(
        self,
        model: Any,
        adapter: Any,
        calibration: torch.Tensor,
        plan: BuildPlan,
        offload: Callable[[], Offload],
    ):
        self.model, self.adapter, self.calibration = model, adapter, calibration
        self.plan, self.offload = plan, offload
        self.shards: dict[int, _HeldShard] = {}

    @classmethod
    def for_session(cls, session: Any) -> ShardHost:
        """A worker's host over its `tyr.pipeline.Session` (plan and offload from the run's config)."""
        from tyr.pipeline import build_plan

        device = session.model.get_input_embeddings().weight.device
        return cls(
            session.model,
            session.adapter,
            session.calibration,
            build_plan(session.cfg, []),
            lambda: shard_offload(session.cfg, device),
        )

    def step(self, call: dict) -> dict | None:
        """One build step on one shard (see the module docstring): capture, propagate or close."""
        if call["op"] == "close":
            return self._close(call)
        with torch.inference_mode():
            held = self._shard(call)
            gene = Gene(*call["gene"])
            if call["op"] == "capture":
                held.ledger.begin_gene(gene.name)
                held.captured = gene
                stats = held.shard.capture(gene)
                return {
                    "hessian": stats.hessian.cpu().numpy(),
                    "total": stats.total.cpu().numpy(),
                    "count": stats.count,
                }
            if call["op"] != "propagate":
                raise ValueError(f"unknown build step {call['op']!r}")
            self._propagate_stored(held, SupernetStore.reader(*held.supernet), gene)
            return None

    def prune(self, gene: list, stats: dict, removed: list[int]) -> dict:
        """Levels of one gene pruned from the driver's summed statistics, on this worker's device."""
        gene = Gene(*gene)
        device = self.adapter.output_proj(gene.layer, gene.kind).weight.device
        input_stats = InputStats(
            torch.tensor(stats["hessian"], device=device),
            torch.tensor(stats["total"], device=device),
            int(stats["count"]),
        )
        with torch.inference_mode():
            results, errors = prune_gene(self.adapter, gene, input_stats, removed, self.plan)
        return {"results": [_result_to_numpy(r) for r in results], "errors": errors}

    def _shard(self, call: dict) -> _HeldShard:
        """The call's shard, built (and brought up to the driver's gene) if this worker lacks it."""
        supernet = (call["supernet_dir"], call["fingerprint_hash"])
        for k in [k for k, held in self.shards.items() if held.supernet != supernet]:
            self.shards.pop(k).shard.close()  # a previous iteration's build
        k, bounds = int(call["shard"]), tuple(call["bounds"])
        held = self.shards.get(k)
        if held is None:
            held = self._open(supernet, bounds)
            self.shards[k] = held
        if held.bounds != bounds:
            raise RuntimeError(f"shard {k} holds sequences {held.bounds}, the driver asks for {bounds}")
        if held.done > call["done"]:
            raise RuntimeError(f"shard {k} has {held.done} genes propagated, the driver only {call['done']}")
        if held.done < call["done"]:
            store = SupernetStore.reader(*supernet)
            genes = genes_of(self.adapter.num_layers)
            logger.info(f"shard {k}: replaying {call['done'] - held.done} finished gene(s) from the store")
            for gene in genes[held.done : call["done"]]:
                self._propagate_stored(held, store, gene)
        return held

    def _open(self, supernet: tuple[str, str], bounds: tuple[int, int]) -> _HeldShard:
        ledger = DeviceLedger(self.model.get_input_embeddings().weight.device)
        a, b = bounds
        shard = BuildShard(self.model, self.adapter, self.calibration[a:b], self.plan, self.offload(), ledger)
        return _HeldShard(supernet, shard, ledger, bounds)

    def _propagate_stored(self, held: _HeldShard, store: SupernetStore, gene: Gene) -> None:
        captured, held.captured = held.captured == gene, None
        if not captured:
            held.ledger.begin_gene(gene.name)
        ladder = store.ladder(gene)
        held.shard.propagate(ladder, [store.variant(gene, level) for level in ladder.levels])
        held.ledger.end_gene(built=captured)
        held.done += 1

    def _close(self, call: dict) -> dict | None:
        """Free the shard; its device ledger (None when this worker never held it, e.g. a fresh replacement)."""
        held = self.shards.pop(int(call["shard"]), None)
        if held is None:
            return None
        held.shard.close()
        return {"sequences": list(held.bounds), **held.ledger.summary()}


def shard_offload(cfg: Any, device: torch.device) -> Offload:
    """Where a worker keeps its shard's hidden states: `supernet.offload` (auto: on a CPU device, else host RAM);
    `disk` in a folder of its own under `supernet.offload_dir` or the node's temporary folder (never the shared
    run directory)."""
    mode = cfg.supernet.offload
    if mode == "auto":
        mode = "none" if device.type == "cpu" else "host"
    if mode != "disk":
        return Offload(mode)
    base = (
        Path(cfg.supernet.offload_dir).expanduser()
        if cfg.supernet.offload_dir
        else Path(tempfile.gettempdir())
    )
    return Offload("disk", base / f"tyr-shard-{uuid.uuid4().hex[:12]}")


def _result_to_numpy(r: LevelResult) -> tuple:
    return (
        r.kept.cpu().numpy(),
        r.weight.cpu().numpy(),
        None if r.bias is None else r.bias.cpu().numpy(),
    )


# -- the driver side -------------------------------------------------------------------------------------------


class RayShards:
    """`supernet.builder.Shards` on the pool's workers (see the module docstring)."""

    def __init__(self, pool: ActorPool, store: SupernetStore, num_sequences: int, batch_size: int):
        self.pool = pool
        self.bounds = shard_bounds(num_sequences, batch_size, pool.num_workers)
        self.base = {
            "supernet_dir": str(Path(store.directory).resolve()),
            "fingerprint_hash": store.fingerprint_hash,
        }
        self.done = 0  # genes every shard has propagated

    def _steps(self, op: str, gene: Gene | None = None) -> list:
        calls = [
            (
                {
                    **self.base,
                    "shard": k,
                    "bounds": list(bounds),
                    "done": self.done,
                    "op": op,
                    "gene": None if gene is None else [gene.layer, gene.kind],
                },
            )
            for k, bounds in enumerate(self.bounds)
        ]
        return self.pool.on_shards("build_step", calls)

    def capture(self, gene: Gene) -> InputStats:
        hessian = total = None
        count = 0
        for part in self._steps("capture", gene):  # in shard order: a fixed summation order
            if hessian is None:
                hessian, total = np.array(part["hessian"]), np.array(part["total"])  # writable copies
            else:
                np.add(hessian, part["hessian"], out=hessian)
                np.add(total, part["total"], out=total)
            count += int(part["count"])
        return InputStats(torch.from_numpy(hessian), torch.from_numpy(total), count)

    def prune(self, ladder: Ladder, stats: InputStats) -> tuple[list[LevelResult], list[float]]:
        removed = [ladder.removed(level) for level in ladder.levels]
        shipped = self.pool.put(
            {"hessian": stats.hessian.numpy(), "total": stats.total.numpy(), "count": stats.count}
        )
        groups = level_groups(len(removed), self.pool.num_workers)
        gene = [ladder.gene.layer, ladder.gene.kind]
        parts = self.pool.map("build_prune", [(gene, shipped, [removed[i] for i in g]) for g in groups])
        results: list = [None] * len(removed)
        errors: list = [None] * len(removed)
        for group, part in zip(groups, parts, strict=True):
            for i, (kept, weight, bias), error in zip(group, part["results"], part["errors"], strict=True):
                results[i] = LevelResult(
                    torch.tensor(kept), torch.tensor(weight), None if bias is None else torch.tensor(bias)
                )
                errors[i] = error
        return results, errors

    def propagate(self, ladder: Ladder, variants: list[Variant]) -> None:
        self._steps("propagate", ladder.gene)  # the workers read the variants from the store
        self.done += 1

    def close(self) -> list[dict]:
        """Free the workers' shards; their device ledgers (shards a replacement never rebuilt are left out)."""
        return [ledger for ledger in self._steps("close") if ledger is not None]


def build_on_workers(
    pool: ActorPool,
    adapter: Any,
    num_sequences: int,
    plan: BuildPlan,
    store: SupernetStore,
    progress: bool = True,
) -> BuildReport:
    """Build (or finish building) the supernet into `store` on the pool's workers (`supernet.builder`'s loop)."""
    shards = RayShards(pool, store, num_sequences, plan.batch_size)
    logger.info(
        f"supernet: data-parallel build over {len(shards.bounds)} worker shard(s) of "
        f"{', '.join(f'{b - a}' for a, b in shards.bounds)} sequences"
    )
    report = drive_build(adapter, plan, store, shards, progress)
    ledgers = shards.close()
    report.ledger = {
        "backend": "ray",
        "batch_size": plan.batch_size,
        "peak_bytes": max((ld["peak_bytes"] for ld in ledgers), default=0),
        "shards": ledgers,
    }
    return report
