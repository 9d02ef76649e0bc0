"""Allocation methods other than the evolutionary search (`search.method`), run inside `tyr run`.

All of them choose one ladder level per gene of an iteration's supernet under exactly the search's budget:

- uniform: every gene at its ladder centre (the target sparsity; the "w/o search" row of the paper).
- owl: OWL's outlier-ratio layer sparsities (dense-model |W|·‖X‖ outliers), projected onto the ladder.
- layer-error: minimum sum of the supernet's per-variant reconstruction errors (dynamic programming).
- random / optuna: random search or Optuna TPE over ladder positions with as many fitness evaluations (and
  calibration tokens) as the evolutionary search would spend in that iteration.

uniform, owl and layer-error are one-shot (iteration 1 only); random and optuna replace the search step of
every coarse-to-fine iteration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tyr import pipeline
from tyr.config import dump_yaml
from tyr.errors import TyrError
from tyr.evaluators.outliers import layer_outlier_ratios
from tyr.io import atomic_write_json, sha256_text
from tyr.search.baselines import allocate_exact, matched_budget, owl_layer_sparsities, project_units
from tyr.search.sampled import sampled_search
from tyr.search.space import Genome, SearchSpace
from tyr.supernet.store import SupernetStore
from tyr.supernet.variant import genes_of


@dataclass(frozen=True)
class Allocation:
    genome: Genome
    fitness: float | None  # on the method's own calibration batch; None when no fitness was computed
    evaluations: int  # fitness evaluations spent
    generations: int  # EA generations or sampler batches


def allocate(
    session: pipeline.Session,
    store: SupernetStore,
    space: SearchSpace,
    iteration: int,
    it_dir: Path,
    make_evaluator: Callable[[SupernetStore], object],
    evolution_config: Callable[[int], object],
    log: Callable[[str], None],
) -> Allocation:
    """The allocation of `session.cfg.search.method` (anything but evolution) for one iteration."""
    method = session.cfg.search.method
    centre = tuple(0 for _ in space.genes)
    if method == "uniform":
        return Allocation(centre, None, 0, 0)
    if method == "owl":
        return Allocation(_owl(session, store, space, it_dir, log), None, 0, 0)
    if method == "layer-error":
        return Allocation(_layer_error(store, space, session.adapter.num_layers), None, 0, 0)
    if method in ("random", "optuna"):
        return _sampled(session, store, space, iteration, it_dir, make_evaluator, evolution_config, log)
    raise TyrError(f"unknown search.method {method!r}")


def _owl(
    session: pipeline.Session, store: SupernetStore, space: SearchSpace, it_dir: Path, log: Callable
) -> Genome:
    cfg, adapter = session.cfg, session.adapter
    log(f"owl: outlier ratios of the dense model (threshold {cfg.search.owl_threshold}x the layer mean)")
    ratios = layer_outlier_ratios(
        session.model,
        [adapter.layer(i) for i in range(adapter.num_layers)],
        session.calibration,
        cfg.search.owl_threshold,
        batch_size=cfg.search.batch_size,
    )
    sparsities = owl_layer_sparsities(ratios, cfg.sparsity, cfg.search.owl_lambda)
    genes = genes_of(adapter.num_layers)
    desired = [(1.0 - sparsities[g.layer]) * store.ladder(g).num_units for g in genes]
    genome = project_units(space, desired)
    atomic_write_json(
        it_dir / "allocation.json",
        {
            "method": "owl",
            "outlier_ratios": ratios,
            "layer_sparsities": sparsities,
            "desired_units": desired,
            "genome": list(genome),
        },
    )
    return genome


def _layer_error(store: SupernetStore, space: SearchSpace, num_layers: int) -> Genome:
    costs = []
    for gene in genes_of(num_layers):
        entries = {e.level: e for e in store.level_entries(gene)}
        errors = [entries[lv].error for lv in store.ladder(gene).levels]
        if any(e is None for e in errors):
            raise TyrError(
                f"the supernet at {store.directory} has no reconstruction errors (built by an older Tyr); "
                "delete it and re-run to rebuild"
            )
        costs.append(errors)
    return allocate_exact(space, costs)


def _sampled(
    session: pipeline.Session,
    store: SupernetStore,
    space: SearchSpace,
    iteration: int,
    it_dir: Path,
    make_evaluator: Callable[[SupernetStore], object],
    evolution_config: Callable[[int], object],
    log: Callable[[str], None],
) -> Allocation:
    cfg = session.cfg
    num_sequences, seq_len = session.calibration.shape
    generations = cfg.search.generations[iteration - 1]
    evaluations, per_evaluation = matched_budget(evolution_config(generations), num_sequences, seq_len)
    if generations == 0:
        evaluations = 0
    if evaluations == 0:
        return Allocation(tuple(0 for _ in space.genes), None, 0, 0)
    rng = np.random.default_rng([cfg.seed, iteration])
    indices = np.sort(rng.choice(num_sequences, size=per_evaluation, replace=False)).astype(np.int64)
    sampler = "random" if cfg.search.method == "random" else "tpe"
    log(
        f"iteration {iteration}: {cfg.search.method} search, {evaluations} evaluations on a fixed batch of "
        f"{per_evaluation} x {seq_len} tokens (the evolution's budget)"
    )
    started = time.perf_counter()

    def on_batch(batch: int, done: int, best: float, seconds: float) -> None:
        elapsed = time.perf_counter() - started
        log(
            f"iter {iteration} batch {batch}: {done}/{evaluations} evaluations, best KL {best:.5f}, "
            f"{seconds:.1f} s/batch, ETA {elapsed / max(done, 1) * (evaluations - done) / 60:.1f} min"
        )

    evaluator = make_evaluator(store)
    try:
        result = sampled_search(
            space,
            evaluator,
            sampler=sampler,
            num_evaluations=evaluations,
            batch_size=cfg.search.num_offspring,
            indices=indices,
            seed=cfg.seed + iteration,
            journal_path=it_dir / "search" / "optuna.journal",
            history_path=it_dir / "search" / "history.jsonl",
            identity=sha256_text(f"{dump_yaml(cfg)}|{store.fingerprint_hash}|{iteration}"),
            tokens_per_evaluation=per_evaluation * seq_len,
            on_batch=on_batch,
        )
    finally:
        evaluator.close()
    return Allocation(result.genome, result.fitness, result.evaluations, result.batches)
