"""Allocation methods (`search.method`): how one iteration picks a ladder level per gene of its supernet.

A table of small classes, one per method; adding a method is one class here (or in a user's own module)
registered with `register_method`, plus its test. Every method holds exactly the search's budget:

- evolution: the EvoPress-style (1+λ) search with multi-stage selection (the default).
- uniform: every gene at its ladder centre (the target sparsity; the "w/o search" row of the paper).
- owl: OWL's outlier-ratio layer sparsities (dense-model |W|·‖X‖ outliers), projected onto the ladder.
- layer-error: minimum sum of the supernet's per-variant reconstruction errors (dynamic programming).
- random / optuna: random search or Optuna TPE over ladder positions with as many fitness evaluations (and
  calibration tokens) as the evolutionary search would spend in that iteration.

One-shot methods (uniform, owl, layer-error) choose once from iteration 1's supernet; the others run in
every coarse-to-fine iteration.

With validation windows (`data.num_validation_sequences`), `tyr.run` makes each iteration's result the best
validation-KL genome of those measured in it: the start and the method's choice for every method, and the
evolution's parents every `search.validate_every` generations too (the evolution measures its own, through
`MethodContext.make_validator`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from tyr.errors import TyrError

if TYPE_CHECKING:  # the registry itself stays cheap to import (`tyr status` reads it)
    from tyr.pipeline import Session
    from tyr.rundir import RunDir
    from tyr.search.evolution import EvolutionConfig
    from tyr.search.space import Genome, SearchSpace
    from tyr.search.state import Validator
    from tyr.supernet.store import SupernetStore


@dataclass(frozen=True)
class Allocation:
    genome: Genome
    fitness: float | None  # on the method's own calibration batches; None when no fitness was computed
    evaluations: int  # fitness evaluations spent
    generations: int  # EA generations or sampler batches
    # what the method measured on the validation windows itself (None: not measured by the method)
    validation_kl: float | None = None  # of `genome`
    start_validation_kl: float | None = None  # of the start genome (every gene at its ladder centre)
    chosen_generation: int | None = (
        None  # the evolution: after which generation `genome` was the parent (0: start)
    )


@dataclass
class MethodContext:
    """What a method may use in one iteration."""

    session: Session
    store: SupernetStore
    space: SearchSpace
    run: RunDir
    iteration: int
    make_evaluator: Callable[[SupernetStore], object]  # fitness backend for this supernet
    evolution_config: Callable[[int], EvolutionConfig]  # the evolution's schedule for N generations
    log: Callable[[str], None]
    # validation KL through a live fitness backend of this supernet (or a fresh one: None); None without
    # validation windows. The returned validator has `close()`.
    make_validator: Callable[[object | None], Validator | None] = lambda evaluator: None

    @property
    def num_generations(self) -> int:
        return self.session.cfg.search.generations[self.iteration - 1]

    @property
    def centre(self) -> Genome:
        return tuple(0 for _ in self.space.genes)

    def identity(self) -> str:
        """What a resumable search checkpoint must match: the run, the supernet and the iteration."""
        return f"{self.run.identity_text()}|{self.store.fingerprint_hash}|{self.iteration}"


class AllocationMethod(ABC):
    """One allocation method. Subclasses set `name` (and `one_shot`) and implement `allocate`."""

    name: ClassVar[str]
    one_shot: ClassVar[bool] = False  # True: chooses once, from iteration 1's supernet
    joint_budget: ClassVar[bool] = False  # True: also works under search.budget=joint (total parameters only)
    description: ClassVar[str] = ""

    @abstractmethod
    def allocate(self, ctx: MethodContext) -> Allocation:
        """The genome (one level per gene of `ctx.space`) this method chooses in this iteration."""


METHODS: dict[str, type[AllocationMethod]] = {}


def register_method(cls: type[AllocationMethod]) -> type[AllocationMethod]:
    """Class decorator: make `cls` available as `search.method: <cls.name>`."""
    METHODS[cls.name] = cls
    return cls


def method(name: str) -> AllocationMethod:
    if name not in METHODS:
        raise TyrError(f"unknown search.method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]()


def is_one_shot(name: str) -> bool:
    """Whether a method chooses once (unknown names, e.g. a method of another Tyr, count as iterative)."""
    return name in METHODS and METHODS[name].one_shot


@register_method
class Evolution(AllocationMethod):
    name = "evolution"
    joint_budget = True
    description = "EvoPress-style (1+λ) search with multi-stage selection, coarse to fine"

    def allocate(self, ctx: MethodContext) -> Allocation:
        from tyr.search.state import evolve

        cfg, run, iteration = ctx.session.cfg, ctx.run, ctx.iteration
        evaluator = ctx.make_evaluator(ctx.store)
        validator = None
        try:
            validator = ctx.make_validator(evaluator)
            state = evolve(
                ctx.space,
                ctx.evolution_config(ctx.num_generations),
                evaluator,
                ctx.centre,
                seed=cfg.seed + iteration,
                state_path=run.state_path(iteration),
                history_path=run.history_path(iteration),
                identity={
                    "config": run.identity_hash(),
                    "supernet": ctx.store.fingerprint_hash,
                    "iteration": iteration,
                },
                num_sequences=ctx.session.calibration.shape[0],
                seq_len=ctx.session.calibration.shape[1],
                on_generation=_generation_logger(ctx.log, iteration, ctx.num_generations),
                validate=validator,
                validate_every=cfg.search.validate_every,
            )
        finally:
            if validator is not None:
                validator.close()
            evaluator.close()  # the next supernet is built from the dense model
        evaluations = run.history_evaluations(iteration)
        best, start = state.best_validated, state.start_validated
        if best is None or start is None:  # no validation windows: the last parent, as always
            return Allocation(tuple(state.parent), state.parent_fitness, evaluations, state.generation)
        return Allocation(
            best.genome,
            best.fitness,
            evaluations,
            state.generation,
            validation_kl=best.validation_kl,
            start_validation_kl=start.validation_kl,
            chosen_generation=best.generation,
        )


def _generation_logger(log: Callable[[str], None], iteration: int, total: int):
    started = time.perf_counter()

    def on_generation(generation: int, result, seconds: float) -> None:
        elapsed = time.perf_counter() - started
        eta = elapsed / max(generation, 1) * (total - generation)  # generations done in this process
        log(
            f"iter {iteration} gen {generation}/{total}: best KL {result.fitness:.5f}, "
            f"{result.num_evaluations / seconds:.2f} eval/s, {result.num_tokens_evaluated / seconds:.0f} tok/s, "
            f"{seconds:.1f} s/gen, ETA {eta / 60:.1f} min"
        )

    return on_generation


@register_method
class Uniform(AllocationMethod):
    name = "uniform"
    one_shot = True
    joint_budget = True
    description = "every module at the target (the paper's 'w/o search' row)"

    def allocate(self, ctx: MethodContext) -> Allocation:
        return Allocation(ctx.centre, None, 0, 0)


@register_method
class Owl(AllocationMethod):
    name = "owl"
    one_shot = True
    description = "OWL: layers with more |W|·‖X‖ outliers are pruned less"

    def allocate(self, ctx: MethodContext) -> Allocation:
        from tyr.evaluators.outliers import layer_outlier_ratios
        from tyr.io import atomic_write_json
        from tyr.search.baselines import owl_layer_sparsities, project_units

        session, cfg, adapter = ctx.session, ctx.session.cfg, ctx.session.adapter
        ctx.log(
            f"owl: outlier ratios of the dense model (threshold {cfg.search.owl_threshold}x the layer mean)"
        )
        ratios = layer_outlier_ratios(
            session.model,
            [adapter.layer(i) for i in range(adapter.num_layers)],
            session.calibration,
            cfg.search.owl_threshold,
            batch_size=cfg.search.batch_size,
        )
        sparsities = owl_layer_sparsities(ratios, cfg.sparsity, cfg.search.owl_lambda)
        desired = [(1.0 - sparsities[g.layer]) * ctx.store.ladder(g).num_units for g in ctx.space.genes]
        genome = project_units(ctx.space, desired)
        atomic_write_json(
            ctx.run.allocation_path(ctx.iteration),
            {
                "method": self.name,
                "outlier_ratios": ratios,
                "layer_sparsities": sparsities,
                "desired_units": desired,
                "genome": list(genome),
            },
        )
        return Allocation(genome, None, 0, 0)


@register_method
class LayerError(AllocationMethod):
    name = "layer-error"
    one_shot = True
    description = "minimum sum of the variants' local reconstruction errors (exact dynamic program)"

    def allocate(self, ctx: MethodContext) -> Allocation:
        from tyr.search.baselines import allocate_exact

        costs = []
        for gene in ctx.space.genes:
            entries = {e.level: e for e in ctx.store.level_entries(gene)}
            errors = [entries[lv].error for lv in ctx.store.ladder(gene).levels]
            if any(e is None for e in errors):
                raise TyrError(
                    f"the supernet at {ctx.store.directory} has no reconstruction errors (built by an older "
                    "Tyr); delete it and re-run to rebuild"
                )
            costs.append(errors)
        return Allocation(allocate_exact(ctx.space, costs), None, 0, 0)


class _Sampled(AllocationMethod):
    """Sampling search with the evolution's evaluation and token budget, on one fixed calibration batch."""

    sampler: ClassVar[str]

    def allocate(self, ctx: MethodContext) -> Allocation:
        import numpy as np

        from tyr.io import sha256_text
        from tyr.search.baselines import matched_budget
        from tyr.search.batch import Batch
        from tyr.search.sampled import sampled_search

        cfg, iteration = ctx.session.cfg, ctx.iteration
        num_sequences, seq_len = ctx.session.calibration.shape
        evaluations, per_evaluation, positions = matched_budget(
            ctx.evolution_config(ctx.num_generations), num_sequences, seq_len
        )
        if ctx.num_generations == 0 or evaluations == 0:
            return Allocation(ctx.centre, None, 0, 0)
        rng = np.random.default_rng([cfg.seed, iteration])
        indices = np.sort(rng.choice(num_sequences, size=per_evaluation, replace=False)).astype(np.int64)
        batch = Batch(tuple(indices), positions)
        ctx.log(
            f"iteration {iteration}: {self.name} search, {evaluations} evaluations on a fixed batch of "
            f"{per_evaluation} x {batch.positions(seq_len)} tokens (the evolution's budget)"
        )
        started = time.perf_counter()

        def on_batch(batch: int, done: int, best: float, seconds: float) -> None:
            elapsed = time.perf_counter() - started
            ctx.log(
                f"iter {iteration} batch {batch}: {done}/{evaluations} evaluations, best KL {best:.5f}, "
                f"{seconds:.1f} s/batch, ETA {elapsed / max(done, 1) * (evaluations - done) / 60:.1f} min"
            )

        evaluator = ctx.make_evaluator(ctx.store)
        try:
            result = sampled_search(
                ctx.space,
                evaluator,
                sampler=self.sampler,
                num_evaluations=evaluations,
                batch_size=cfg.search.num_offspring,
                indices=batch,
                seed=cfg.seed + iteration,
                journal_path=ctx.run.journal_path(iteration),
                history_path=ctx.run.history_path(iteration),
                identity=sha256_text(ctx.identity()),
                tokens_per_evaluation=batch.num_tokens(seq_len),
                on_batch=on_batch,
            )
        finally:
            evaluator.close()
        return Allocation(result.genome, result.fitness, result.evaluations, result.batches)


@register_method
class RandomSearch(_Sampled):
    name = "random"
    sampler = "random"
    description = "random ladder positions projected onto the budget; the best of N (the start included)"


@register_method
class OptunaSearch(_Sampled):
    name = "optuna"
    sampler = "tpe"
    description = "Optuna TPE over ladder positions projected onto the budget (first trial: the start)"
