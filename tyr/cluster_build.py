"""The data-parallel supernet build on the run's Ray workers (`backend.kind: ray`).

The calibration sequences are split into shards, contiguous ranges of whole chunks of `supernet.batch_size`
sequences (so every chunk is the serial build's chunk); worker k holds shard k's hidden states
(`tyr.supernet.builder.BuildShard`) for the whole build. Per gene, `supernet.builder.drive_build` on the driver
runs the same three steps as the serial build, here spread over the workers:

1. capture: every worker computes its shard's input statistics (H = Σ XᵀX in float32, Σ X in float64, the token
   count), which stay in the cluster's object store; the workers add them by a fixed pairwise tree (round by
   round (0+1), (2+3), ...: log2 of the shards' rounds, each worker sending at most one partial per round, and
   the same grouping for a given number of shards). One worker gives the serial build's bits; more workers give
   H within float32 rounding of it (the chunks' sums are grouped differently), tested within rtol 1e-6.
2. prune: the gene's levels are independent given H, so they are split over the workers (level i to group
   i mod G), which fetch the sum, prune on their devices and write their levels' files into the store (on
   storage shared by every node); the driver then records the gene (its record and the manifest: one writer).
3. propagate: every worker reads the gene's variants from the store and adds their expected output to its shard.

The driver holds no model tensors, no Hessian and no variant: per gene only manifest entries reach it.

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

from tyr.supernet.builder import (
    BuildPlan,
    BuildReport,
    BuildShard,
    Offload,
    drive_build,
    level_variants,
    prune_gene,
    variant_params,
)
from tyr.supernet.criteria import InputStats
from tyr.supernet.ladder import Ladder
from tyr.supernet.ledger import DeviceLedger
from tyr.supernet.store import SupernetStore, write_variant_file
from tyr.supernet.variant import Gene, genes_of

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
        """One build step on one shard (see the module docstring): propagate or close."""
        if call["op"] == "close":
            return self._close(call)
        if call["op"] != "propagate":
            raise ValueError(f"unknown build step {call['op']!r}")
        with torch.inference_mode():
            held = self._shard(call)
            self._propagate_stored(held, SupernetStore.reader(*held.supernet), Gene(*call["gene"]))
        return None

    def capture(self, call: dict) -> tuple[int, dict]:
        """The shard's partial statistics of the call's gene: (token count, {hessian, total} as arrays). Two
        values, so the driver can check the call without fetching the arrays (they go to `combine`)."""
        with torch.inference_mode():
            held = self._shard(call)
            gene = Gene(*call["gene"])
            held.ledger.begin_gene(gene.name)
            held.captured = gene
            stats = held.shard.capture(gene)
        payload = {
            "hessian": stats.hessian.cpu().numpy(),
            "total": stats.total.cpu().numpy(),
            "count": stats.count,
        }
        return stats.count, payload

    @staticmethod
    def combine(first: dict, second: dict) -> tuple[int, dict]:
        """The sum of two partial statistics (`first` + `second`, elementwise, in that order)."""
        payload = {
            "hessian": np.add(first["hessian"], second["hessian"]),
            "total": np.add(first["total"], second["total"]),
            "count": int(first["count"]) + int(second["count"]),
        }
        return payload["count"], payload

    def prune(self, call: dict, stats: dict) -> list[dict]:
        """The call's levels of one gene pruned from the summed statistics on this worker's device, their files
        written into the supernet being built; their manifest entries (`SupernetStore.record_gene`)."""
        gene = Gene(*call["gene"])
        ladder = Ladder(gene, *call["ladder"])
        levels = [int(lv) for lv in call["levels"]]
        proj = self.adapter.output_proj(gene.layer, gene.kind)
        device = proj.weight.device
        input_stats = InputStats(
            torch.tensor(stats["hessian"], device=device),
            torch.tensor(stats["total"], device=device),
            int(stats["count"]),
        )
        removed = [ladder.removed(level) for level in levels]
        with torch.inference_mode():
            results, errors = prune_gene(self.adapter, gene, input_stats, removed, self.plan)
        del input_stats
        variants = level_variants(self.adapter, ladder, levels, results, self.plan)
        return [
            write_variant_file(call["supernet_dir"], v, variant_params(self.adapter, proj, v), error)
            for v, error in zip(variants, errors, strict=True)
        ]

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


# -- the driver side -------------------------------------------------------------------------------------------


class RayShards:
    """`supernet.builder.Shards` on the pool's workers (see the module docstring)."""

    def __init__(
        self, pool: ActorPool, adapter: Any, store: SupernetStore, num_sequences: int, batch_size: int
    ):
        self.pool, self.adapter = pool, adapter
        self.bounds = shard_bounds(num_sequences, batch_size, pool.num_workers)
        self.base = {
            "supernet_dir": str(Path(store.directory).resolve()),
            "fingerprint_hash": store.fingerprint_hash,
        }
        self.done = 0  # genes every shard has propagated

    def _steps(self, method: str, op: str, gene: Gene | None = None, keep: bool = False) -> list:
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
        return self.pool.on_shards(method, calls, keep=keep)

    def capture(self, gene: Gene) -> Any:
        """The gene's statistics summed over the shards by a fixed pairwise tree on the workers: round by round,
        neighbours (0+1), (2+3), ... are added, an odd last one passed on; the sum stays in the cluster's object
        store (a reference: the driver never holds a Hessian)."""
        parts = self._steps("build_capture", "capture", gene, keep=True)
        while len(parts) > 1:
            pairs = [(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
            parts = self.pool.map("build_combine", pairs, keep=True) + parts[len(pairs) * 2 :]
        return parts[0]

    def prune(self, ladder: Ladder, stats: Any, store: SupernetStore) -> None:
        """The gene's levels pruned in groups on the workers, which write their files; the driver records it."""
        groups = level_groups(len(ladder.levels), self.pool.num_workers)
        gene = ladder.gene
        shape = [ladder.num_units, ladder.centre_removed, ladder.step, list(ladder.levels)]
        calls = [
            (
                {
                    **self.base,
                    "gene": [gene.layer, gene.kind],
                    "ladder": shape,
                    "levels": [ladder.levels[i] for i in group],
                },
                stats,
            )
            for group in groups
        ]
        entries = {entry["level"]: entry for part in self.pool.map("build_prune", calls) for entry in part}
        store.record_gene(
            ladder, self.adapter.group_size(gene.kind), [entries[level] for level in ladder.levels]
        )

    def propagate(self, ladder: Ladder, store: SupernetStore) -> None:
        self._steps("build_step", "propagate", ladder.gene)  # the workers read the variants from the store
        self.done += 1

    def close(self) -> list[dict]:
        """Free the workers' shards; their device ledgers (shards a replacement never rebuilt are left out)."""
        return [ledger for ledger in self._steps("build_step", "close") if ledger is not None]


def build_on_workers(
    pool: ActorPool,
    adapter: Any,
    num_sequences: int,
    plan: BuildPlan,
    store: SupernetStore,
    progress: bool = True,
) -> BuildReport:
    """Build (or finish building) the supernet into `store` on the pool's workers (`supernet.builder`'s loop)."""
    shards = RayShards(pool, adapter, store, num_sequences, plan.batch_size)
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
