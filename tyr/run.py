"""`tyr run`: teacher targets → coarse-to-fine iterations (supernet + search) → final architecture + metrics.

Every step is resumable: the teacher targets, each finished supernet gene, each search generation and each
finished iteration are checkpointed in the run directory; re-running the same command continues from there
and ends with the same result as an uninterrupted run.

With validation windows (`data.num_validation_sequences`) the coarse-to-fine loop is monotone: an iteration's
result is the best validation-KL genome measured in it (its start included), the next iteration is built around
the best result so far, and the final model is the best result of all iterations. So a run never ends worse on
validation than its uniform start or its first iteration.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from tyr import methods, pipeline
from tyr.config import RunConfig, resumed_config
from tyr.data import TextSource, calibration_split, load_tokens
from tyr.errors import TyrError
from tyr.evaluators.hidden import TeacherHidden, compute_and_save_teacher_hidden, hidden_layers
from tyr.evaluators.kl import sparse_kl
from tyr.evaluators.perplexity import perplexity
from tyr.evaluators.teacher import (
    StackedTargets,
    TeacherTargets,
    compute_and_save_teacher_targets,
    compute_teacher_targets,
)
from tyr.io import atomic_write_json, sha256_tensor
from tyr.rundir import RunDir, Selection
from tyr.search.batch import Batch
from tyr.search.evaluator import SerialEvaluator
from tyr.search.evolution import EvolutionConfig, Stage
from tyr.search.space import Budget, GeneLadder, SearchSpace
from tyr.supernet.criteria import CRITERIA
from tyr.supernet.store import SupernetStore
from tyr.supernet.variant import genes_of

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class IterationResult:
    iteration: int
    genome: tuple[int, ...]
    fitness: float | None
    centres: list[int]  # units removed per gene at the chosen levels (the next centres, if it is the best)
    method: str | None = None
    validation_kl: float | None = None  # None: the run has no validation windows


@dataclass
class Validation:
    """The held-out validation windows and their dense top-K targets."""

    tokens: torch.Tensor  # (num_validation_sequences, seq_len) int64
    targets: TeacherTargets


class Validator:
    """Validation KL of genomes: sparse top-K KL(dense ‖ candidate) over every validation window, scored by a
    fitness backend on one batch of all of them (the fitness protocol, unchanged)."""

    def __init__(self, evaluator, batch: Batch, store: SupernetStore, owned: bool):
        self.evaluator, self.batch, self.store, self.owned = evaluator, batch, store, owned

    def __call__(self, genomes: Sequence[tuple[int, ...]]) -> list[float]:
        return [float(v) for v in self.evaluator(list(genomes), self.batch)]

    def close(self) -> None:
        if self.owned:  # a borrowed backend is closed by its owner
            self.evaluator.close()


def run(
    cfg: RunConfig, out: str | Path, force: bool = False, progress: bool = True, verbose: bool = False
) -> dict:
    """The whole pipeline; returns the final metrics (also written to RUN/final/metrics.json).

    The run directory is locked for the whole command: a second `tyr run` on it fails at once.
    """
    with RunDir(out).lock() as locked:
        return _run(cfg, locked, force, progress, verbose)


def _run(cfg: RunConfig, locked: RunDir, force: bool, progress: bool, verbose: bool) -> dict:
    run_dir, session = pipeline.open_run(cfg, locked, force, progress, driver=True)
    session.cfg, upgraded = resumed_config(session.cfg, session.identity)
    if upgraded:
        logger.warning(
            f"{run_dir.path} began before {', '.join(upgraded)} existed; it continues as it began "
            f"({', '.join(f'{k}={_setting(session.cfg, k)}' for k in upgraded)})"
        )
    workers = ray_workers(session, run_dir, verbose)  # None on the serial backend; started on first use
    try:
        if workers is not None and not run_dir.has_teacher():
            # the workers read the run's kept windows: keep them before they compute the teacher's rows
            pipeline.keep_tokens(run_dir, "calibration", session.calibration)
        targets = ensure_teacher_targets(session, run_dir.teacher_dir, progress, workers=workers)
        pipeline.keep_tokens(run_dir, "calibration", session.calibration)  # confirmed by the targets' hash
        validation = validation_set(session, run_dir, progress, workers)
        hidden = ensure_teacher_hidden(session, run_dir, progress)
        make_evaluator, make_validator = fitness_backend(
            session, targets, progress, validation, hidden, workers
        )
        centres = pipeline.uniform_centres(session.adapter, cfg)
        best = None
        for iteration in range(1, num_iterations(session.cfg) + 1):
            result = run_iteration(
                session,
                targets,
                run_dir,
                iteration,
                centres,
                make_evaluator,
                progress,
                make_validator,
                workers,
            )
            best = best_of(best, result)
            centres = best.centres
        return finalise(session, run_dir, best, progress, workers)
    finally:
        if workers is not None:
            workers.close()


def ray_workers(session: pipeline.Session, run_dir: RunDir, verbose: bool):
    """The run's Ray workers (`tyr.cluster.RayEvaluatorFactory`: actors started on first use and kept for the
    whole run: the teacher pass, then every iteration's search), or None on the serial backend."""
    if session.cfg.backend.kind != "ray":
        return None
    from tyr.cluster import ray_evaluator_factory

    dtype = next(session.model.parameters()).dtype  # the run's (in every supernet's fingerprint)
    return ray_evaluator_factory(session.cfg, run_dir.path, verbose=verbose, model_dtype=dtype)


def _setting(cfg: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def best_of(best: IterationResult | None, result: IterationResult) -> IterationResult:
    """The better of the best result so far and a later one: the lower validation KL (the earlier on a tie);
    without validation, the later one (coarse to fine as before validation existed)."""
    if best is None or best.validation_kl is None or result.validation_kl is None:
        return result
    return result if result.validation_kl < best.validation_kl or math.isnan(best.validation_kl) else best


def num_iterations(cfg: RunConfig) -> int:
    """One-shot methods pick their allocation from iteration 1's supernet; the others refine coarse to fine."""
    return 1 if methods.is_one_shot(cfg.search.method) else cfg.search.num_iterations


def fitness_backend(
    session: pipeline.Session,
    targets: TeacherTargets,
    progress: bool,
    validation: Validation | None = None,
    hidden: TeacherHidden | None = None,
    workers=None,
) -> tuple[
    Callable[[SupernetStore], object],
    Callable[[SupernetStore, object | None], Validator | None],
]:
    """(make_evaluator(store), make_validator(store, evaluator)): the serial evaluator, or the Ray `workers`'
    (`ray_workers`). make_validator gives None without validation windows.

    Validation goes through the search's own backend: its model and rows are the calibration windows followed
    by the validation windows (serial: this process's evaluator, or one of its own when it is given none; Ray:
    the workers, which stack the same rows), so validation scores rows N.. of the same realised model.
    """
    num_calibration = session.calibration.shape[0]
    tokens, rows = session.calibration, targets
    if validation is not None:
        tokens = torch.cat([session.calibration, validation.tokens])  # (N + V, seq_len)
        rows = StackedTargets(targets, validation.targets)

    def serial(store: SupernetStore, tokens=tokens, rows=rows, hidden=hidden) -> SerialEvaluator:
        return search_evaluator(session, store, rows, tokens, hidden, progress=progress)

    def make_validator(store: SupernetStore, evaluator: object | None = None) -> Validator | None:
        if validation is None:
            return None
        num_validation = validation.tokens.shape[0]
        if isinstance(evaluator, SerialEvaluator) and evaluator.targets is rows:
            batch = Batch(tuple(range(num_calibration, num_calibration + num_validation)))
            return Validator(evaluator, batch, store, owned=False)
        own = serial(store, validation.tokens, validation.targets, hidden=None)  # validation: KL alone
        own.progress = False
        return Validator(own, Batch(tuple(range(num_validation))), store, owned=True)

    def ray_validator(store: SupernetStore, evaluator: object | None = None) -> Validator | None:
        if validation is None:
            return None
        batch = Batch(tuple(range(num_calibration, num_calibration + validation.tokens.shape[0])))
        same = getattr(evaluator, "supernet_dir", None) == Path(store.directory).resolve()
        return Validator(evaluator if same else workers(store.directory), batch, store, owned=False)

    if workers is not None:
        return (lambda store: workers(store.directory)), ray_validator
    return serial, make_validator


def search_evaluator(
    session: pipeline.Session,
    store: SupernetStore,
    targets,
    tokens: torch.Tensor,
    hidden: TeacherHidden | None,
    **options,
) -> SerialEvaluator:
    """The search's serial fitness backend on `session`'s model, configured from `search.*` (`options`
    override those keyword arguments: a Ray worker's share of the host memory, a progress bar)."""
    se = session.cfg.search
    settings = {
        "mode": se.realisation,
        "batch_size": se.batch_size,
        "variant_cache_bytes": se.variant_cache_bytes,
        "variant_device_bytes": se.variant_device_bytes,
        "prefix_cache_bytes": se.prefix_cache_bytes,
        "hidden": hidden,
        "hidden_weight": se.hidden_weight,
        **options,
    }
    return SerialEvaluator(session.model, session.adapter, store, targets, tokens, **settings)


def ensure_teacher_hidden(session: pipeline.Session, run_dir: RunDir, progress: bool) -> TeacherHidden | None:
    """The dense teacher's hidden states at the fitness's blocks (`search.fitness: kl+hidden` with a method
    that evaluates fitness), computed once per run; None otherwise. Damaged stored states are recomputed."""
    cfg = session.cfg
    if cfg.search.fitness != "kl+hidden" or methods.is_one_shot(cfg.search.method):
        return None
    directory = run_dir.teacher_hidden_dir
    tokens_sha = sha256_tensor(session.calibration)
    hidden = _stored(lambda: TeacherHidden.open(directory, verify=True), directory, "teacher hidden states")
    if hidden is not None:
        if hidden.meta.get("tokens_sha256") == tokens_sha:
            return hidden
        raise TyrError(
            f"the calibration tokens differ from those the teacher hidden states in {directory} were "
            "computed on (did the data source change?); restore the data, or start a new run in another --out"
        )
    indices = hidden_layers(session.adapter.num_layers)
    logger.info(f"teacher: hidden states of blocks {indices} for the kl+hidden fitness")
    return compute_and_save_teacher_hidden(
        session.model,
        [session.adapter.layer(i) for i in indices],
        indices,
        session.calibration,
        directory,
        batch_size=cfg.search.batch_size,
        progress=progress,
    )


def validation_set(
    session: pipeline.Session, run_dir: RunDir, progress: bool, workers: Any = None
) -> Validation | None:
    """The validation windows (the next windows of the calibration draw) and their teacher targets (on the Ray
    `workers` when given); None when `data.num_validation_sequences` is 0."""
    data, cfg = session.cfg.data, session.cfg
    if data.num_validation_sequences == 0:
        return None
    tokens = load_tokens(run_dir.tokens_path("validation"), (data.num_validation_sequences, data.seq_len))
    if tokens is None:
        tokens = session.validation  # read with the calibration windows (a run that kept no windows yet)
    if tokens is None:  # resumed on its kept calibration windows: read the source for the validation ones
        source = TextSource(
            data.calibration, data.calibration_config, data.calibration_split, data.text_field
        )
        fit, tokens = calibration_split(
            source,
            session.tokenizer,
            data.num_sequences,
            data.num_validation_sequences,
            data.seq_len,
            cfg.seed,
            data.max_source_tokens,
        )
        if not torch.equal(fit, session.calibration):
            raise TyrError(
                "the calibration windows read for validation differ from the run's (did the data source change "
                "since the run started?); restore the data, or start a new run in another --out"
            )
    if workers is not None:  # the workers read the kept windows: keep them before they compute the rows
        pipeline.keep_tokens(run_dir, "validation", tokens)
    targets = ensure_teacher_targets(
        session, run_dir.validation_teacher_dir, progress, tokens, "validation", workers
    )
    pipeline.keep_tokens(run_dir, "validation", tokens)
    return Validation(tokens, targets)


def ensure_teacher_targets(
    session: pipeline.Session,
    directory: Path,
    progress: bool,
    tokens: torch.Tensor | None = None,
    what: str = "calibration",
    workers=None,
) -> TeacherTargets:
    """Dense top-K logits of the calibration set (or of `tokens`: the validation windows), computed once per run.

    Resuming, the stored digest is checked once per command (it reads the whole file, 206 GB at the paper
    setting, hashed by every core: `tyr.io.blocked_sha256_file`). Damaged targets (changed bytes, unreadable metadata) are recomputed, with a warning:
    they are derived data, and the same model and tokens give the same targets.

    With Ray `workers` each worker computes blocks of `search.batch_size` sequences of the run's kept `what`
    windows and writes them into the targets file on the shared run directory: the same blocks, so the same bytes.
    """
    tokens = session.calibration if tokens is None else tokens
    tokens_sha = sha256_tensor(tokens)
    targets = None
    if (directory / "meta.json").is_file():
        targets = _stored(lambda: TeacherTargets.open(directory, verify=True), directory, "teacher targets")
    if targets is not None:
        if targets.meta.get("tokens_sha256") == tokens_sha and targets.k == session.cfg.search.topk:
            return targets
        raise TyrError(
            f"the {what} tokens differ from those the teacher targets in {directory} were computed on "
            "(did the data source change?); restore the data, or start a new run in another --out"
        )
    where = f" on {session.cfg.backend.num_workers} Ray workers" if workers is not None else ""
    logger.info(
        f"teacher: top-{session.cfg.search.topk} logits of {tuple(tokens.shape)} {what} tokens{where}"
    )
    return compute_and_save_teacher_targets(
        session.model,
        tokens,
        session.cfg.search.topk,
        directory,
        batch_size=session.cfg.search.batch_size,
        meta={"tokens_sha256": tokens_sha},
        progress=progress,
        fill=workers.teacher_fill(what) if workers is not None else None,
    )


def _stored(open_verified: Callable[[], T], directory: Path, what: str) -> T | None:
    """Stored derived data opened with its sha256 checked, or None when `directory` is absent, or damaged (then
    removed with a warning: the same model and tokens give the same data again, so it is recomputed)."""
    if not directory.is_dir():
        return None
    try:
        return open_verified()
    except TyrError as e:
        logger.warning(f"the {what} are damaged ({e}); recomputing them")
        shutil.rmtree(directory)
        return None


def run_iteration(
    session: pipeline.Session,
    targets: TeacherTargets,
    run_dir: RunDir,
    iteration: int,
    centres: list[int],
    make_evaluator: Callable[[SupernetStore], object],
    progress: bool = True,
    make_validator: Callable[[SupernetStore, object | None], Validator | None] | None = None,
    workers: Any = None,
) -> IterationResult:
    """Build the supernet around `centres` with this iteration's step (on the run's Ray `workers` when given),
    then let the method choose; with validation, the result is the better of the method's choice and the start
    on the validation windows."""
    if run_dir.result_path(iteration).is_file():
        return _read_result(run_dir, iteration, session.adapter.num_layers)
    logger.info(f"iteration {iteration}: building the supernet")
    store, report = pipeline.build_iteration_supernet(
        session, run_dir.supernet_dir(iteration), centres, iteration, progress=progress, workers=workers
    )
    logger.info(
        f"iteration {iteration}: supernet ready ({report.genes_built} genes built, {report.genes_reused} reused, "
        f"{report.seconds:.0f} s)"
    )
    cfg = session.cfg
    context = methods.MethodContext(
        session=session,
        store=store,
        space=search_space(session, store),
        run=run_dir,
        iteration=iteration,
        make_evaluator=make_evaluator,
        evolution_config=lambda generations: evolution_config(cfg, generations, iteration),
        log=logger.info,
        make_validator=lambda evaluator: None if make_validator is None else make_validator(store, evaluator),
    )
    allocation = methods.method(cfg.search.method).allocate(context)
    if make_validator is not None:
        allocation = validated(allocation, context, lambda: make_validator(store, None))
    return _save_result(session, store, run_dir, iteration, allocation)


def validated(
    allocation: methods.Allocation,
    ctx: methods.MethodContext,
    make_validator: Callable[[], Validator | None],
) -> methods.Allocation:
    """`allocation` with its and the start genome's validation KL (measured here unless the method did), or the
    start instead when that is strictly better on validation. Unchanged without validation windows."""
    start = ctx.centre
    chosen_kl, start_kl = allocation.validation_kl, allocation.start_validation_kl
    if chosen_kl is None or start_kl is None:
        validator = make_validator()
        if validator is None:
            return allocation
        try:
            if start_kl is None:
                start_kl = validator([start])[0]
            if chosen_kl is None:
                chosen_kl = start_kl if allocation.genome == start else validator([allocation.genome])[0]
        finally:
            validator.close()
    allocation = dataclasses.replace(allocation, validation_kl=chosen_kl, start_validation_kl=start_kl)
    ctx.log(
        f"iteration {ctx.iteration}: validation KL {chosen_kl:.5f} of the {ctx.session.cfg.search.method} result, "
        f"{start_kl:.5f} of the start"
    )
    if start_kl < chosen_kl or (math.isnan(chosen_kl) and not math.isnan(start_kl)):
        ctx.log(f"iteration {ctx.iteration}: the start is better on validation; it is the result")
        return dataclasses.replace(
            allocation, genome=start, fitness=None, validation_kl=start_kl, chosen_generation=0
        )
    return allocation


def _save_result(
    session: pipeline.Session,
    store: SupernetStore,
    run_dir: RunDir,
    iteration: int,
    allocation: methods.Allocation,
) -> IterationResult:
    genome = allocation.genome
    chosen = [
        store.ladder(g).removed(lv)
        for g, lv in zip(genes_of(session.adapter.num_layers), genome, strict=True)
    ]
    run_dir.write_result(
        iteration,
        {
            "iteration": iteration,
            "method": session.cfg.search.method,
            "genome": list(genome),
            "fitness": allocation.fitness,
            "centres": chosen,
            "generations": allocation.generations,
            "evaluations": allocation.evaluations,
            "validation_kl": _json_float(allocation.validation_kl),
            "start_validation_kl": _json_float(allocation.start_validation_kl),
            "chosen_generation": allocation.chosen_generation,
        },
    )
    return IterationResult(
        iteration,
        genome,
        allocation.fitness,
        chosen,
        session.cfg.search.method,
        _json_float(allocation.validation_kl),
    )


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _read_result(run_dir: RunDir, iteration: int, num_layers: int) -> IterationResult:
    path = run_dir.result_path(iteration)
    data = run_dir.read_result(iteration)
    try:
        result = IterationResult(
            int(data["iteration"]),
            tuple(int(v) for v in data["genome"]),
            data["fitness"],
            [int(c) for c in data["centres"]],
            data.get("method"),
            data.get("validation_kl"),
        )
    except (TypeError, KeyError, ValueError) as e:
        raise TyrError(f"{path} is corrupt ({e}); delete it to redo that iteration's search") from None
    genes = len(genes_of(num_layers))
    if len(result.genome) != genes or len(result.centres) != genes or result.iteration != iteration:
        raise TyrError(
            f"{path} is corrupt (it describes {len(result.genome)} genes of iteration {result.iteration}, the "
            f"model has {genes}); delete it to redo that iteration's search"
        )
    return result


def search_space(session: pipeline.Session, store: SupernetStore) -> SearchSpace:
    """Genes with their levels and exact costs from the manifest; budget from the target (ALGORITHM §5)."""
    ladders = []
    for gene in genes_of(session.adapter.num_layers):
        ladder = store.ladder(gene)
        entries = {e.level: e for e in store.level_entries(gene)}
        ladders.append(
            GeneLadder(
                gene=gene,
                levels=ladder.levels,
                units_kept=tuple(ladder.num_units - ladder.removed(lv) for lv in ladder.levels),
                params_kept=tuple(entries[lv].params for lv in ladder.levels),
            )
        )
    return SearchSpace(ladders, target_budget(session, ladders))


def target_budget(session: pipeline.Session, ladders: list[GeneLadder]) -> Budget:
    """Per type: the target's kept units per module type, held exactly (level switches within a type).

    The parameter cap is the uniform target architecture's count with every KV head kept: any allocation with
    the same unit counts keeps at most that many parameters, and `joint` mode may trade attention for MLP
    under it.
    """
    adapter, cfg = session.adapter, session.cfg
    centres = pipeline.uniform_centres(adapter, cfg)
    units = {"attn": 0, "mlp": 0}
    max_params = 0
    for gene, removed in zip(genes_of(adapter.num_layers), centres, strict=True):
        kept = adapter.num_units(gene.kind) - removed
        units[gene.kind] += kept
        max_params += pipeline.max_module_params(adapter, gene.kind, kept)
    if CRITERIA[cfg.supernet.criterion].adds_output_bias:  # each pruned module may gain a d_out bias
        max_params += adapter.hidden_size * len(centres)
    if cfg.search.budget == "joint":
        return Budget("joint", max_params, None)
    return Budget("per_type", max_params, units)


def evolution_config(cfg: RunConfig, num_generations: int, iteration: int = 1) -> EvolutionConfig:
    """The evolution's schedule in iteration `iteration` (its stages and the selection rule)."""
    se = cfg.search
    evo = EvolutionConfig(
        num_generations=max(num_generations, 1),
        num_offspring=se.num_offspring,
        stages=tuple(Stage(int(s), int(t)) for s, t in se.stages_for(iteration)),
        max_mutations=se.max_mutations,
        max_level_distance=se.max_level_distance,
        selection=se.selection,
    )
    evo.validate()
    if num_generations == 0:
        evo = dataclasses.replace(evo, num_generations=0)
    return evo


def finalise(
    session: pipeline.Session, run_dir: RunDir, result: IterationResult, progress: bool, workers: Any = None
) -> dict:
    """Record the chosen result, check the supernets it needs, measure dense / uniform / searched (on one of the
    Ray `workers` when given), write final/.

    A finished run is measured again only when its held-out data changed (evaluation is not run identity).
    """
    selection = Selection(
        result.iteration, result.genome, result.fitness, result.method, result.validation_kl
    )
    if result.validation_kl is not None:
        logger.info(
            f"final model: iteration {result.iteration}'s result, the best on validation "
            f"(KL {result.validation_kl:.5f})"
        )
    last = verified_supernet(session, run_dir, selection.iteration, progress)
    first = last if selection.iteration == 1 else verified_supernet(session, run_dir, 1, progress)
    evaluation = evaluation_record(session)
    metrics = run_dir.read_metrics()
    if metrics is not None and metrics.get("evaluation", evaluation) == evaluation:
        logger.info(f"{run_dir.path} is finished; final metrics in {run_dir.metrics_path}")
        return metrics
    run_dir.write_selection(selection)  # first: export and eval find the final genome through it
    architecture = pipeline.architecture(session, last, selection.genome, session.cfg.sparsity)
    atomic_write_json(run_dir.architecture_path, architecture)
    if workers is not None:  # its parts in parallel, one worker each
        parts = workers.final_metrics(first, last, selection.genome, session.eval_tokens, MEASURED)
        metrics = metrics_header(session.cfg, session.eval_tokens) | dict(zip(MEASURED, parts, strict=True))
    else:
        metrics = measure(session, first, last, selection.genome)
    metrics["evaluations"] = run_dir.evaluations(run_dir.finished_iterations())
    metrics["evaluation"] = evaluation
    metrics["achieved_sparsity"] = architecture["achieved_sparsity"]
    atomic_write_json(run_dir.metrics_path, metrics)
    logger.info(
        f"perplexity on {session.cfg.data.eval}: dense {metrics['dense']['ppl']:.2f}, "
        f"uniform {metrics['uniform']['ppl']:.2f}, searched {metrics['searched']['ppl']:.2f} "
        f"(sparsity {architecture['achieved_sparsity']:.3f})"
    )
    return metrics


def verified_supernet(
    session: pipeline.Session, run_dir: RunDir, iteration: int, progress: bool
) -> SupernetStore:
    """A finished iteration's supernet with every variant file checked against its sha256 (once per command).

    A damaged one (a file changed or missing, an unreadable manifest) is rebuilt from the dense model around
    the same centres; the build is deterministic, so the iteration's result still describes it.
    """
    directory = run_dir.supernet_dir(iteration)
    try:
        store = SupernetStore.open(directory)
        store.verify()
        return store
    except TyrError as e:
        logger.warning(f"iteration {iteration}'s supernet is damaged ({e}); rebuilding it")
    if run_dir.read_manifest(iteration) is None:
        run_dir.manifest_path(iteration).unlink(missing_ok=True)  # unreadable: rebuild every gene
    store, _ = pipeline.build_iteration_supernet(
        session, directory, _centres_of(session, run_dir, iteration), iteration, progress=progress
    )
    return store


def _centres_of(session: pipeline.Session, run_dir: RunDir, iteration: int) -> list[int]:
    """The centres iteration `iteration` was built around: the target's, or the best earlier result's (the
    previous one's without validation)."""
    if iteration == 1:
        return pipeline.uniform_centres(session.adapter, session.cfg)
    best = None
    for earlier in range(1, iteration):
        best = best_of(best, _read_result(run_dir, earlier, session.adapter.num_layers))
    return best.centres


def evaluation_record(session: pipeline.Session) -> dict:
    """What the final metrics are measured on (recorded in metrics.json; not part of the run's identity)."""
    data = session.cfg.data
    tokens = session.eval_tokens
    return {
        "data": data.eval,
        "config": data.eval_config,
        "split": data.eval_split,
        "text_field": data.text_field,
        "seq_len": data.seq_len,
        "num_sequences": data.num_eval_sequences,
        "num_tokens": int(tokens.numel()),
        "tokens_sha256": sha256_tensor(tokens),
    }


MEASURED = ("dense", "uniform", "searched")  # the final metrics' parts; each can run in its own process


def measure(
    session: pipeline.Session, first: SupernetStore, last: SupernetStore, genome: tuple[int, ...]
) -> dict:
    """Held-out perplexity and top-K KL to the dense model: dense, uniform (iteration 1's centre), searched."""
    cfg, eval_tokens = session.cfg, session.eval_tokens
    logger.info(
        f"evaluating dense / uniform / searched on {tuple(eval_tokens.shape)} held-out tokens ({cfg.data.eval})"
    )
    targets = dense_targets(session)
    return metrics_header(cfg, eval_tokens) | {
        part: measure_part(session, part, first, last, genome, targets) for part in MEASURED
    }


def metrics_header(cfg: RunConfig, eval_tokens: torch.Tensor) -> dict:
    return {
        "method": cfg.search.method,
        "criterion": cfg.supernet.criterion,
        "eval_data": cfg.data.eval,
        "eval_tokens": int(eval_tokens.numel()),
        "topk": cfg.search.topk,
    }


def dense_targets(session: pipeline.Session) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense model's top-K (values, indices) on the held-out tokens: what the final KLs are measured to."""
    cfg = session.cfg
    return compute_teacher_targets(
        session.model, session.eval_tokens, cfg.search.topk, batch_size=cfg.search.batch_size
    )


def measure_part(
    session: pipeline.Session,
    part: str,
    first: SupernetStore,
    last: SupernetStore,
    genome: tuple[int, ...],
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """One part of the final metrics (`MEASURED`): the dense model's perplexity, or the uniform structure's
    (iteration 1's centre, from `first`) or the searched `genome`'s (from `last`) perplexity, KL to the dense
    model (`targets`; computed here when None) and prunable parameters. The same numbers in any process."""
    cfg, eval_tokens = session.cfg, session.eval_tokens
    bs = cfg.search.batch_size
    if part == "dense":
        return {"ppl": perplexity(session.model, eval_tokens, batch_size=bs), "kl": 0.0}
    values, indices = targets if targets is not None else dense_targets(session)
    genes = genes_of(session.adapter.num_layers)
    store, chosen = (first, tuple(0 for _ in genes)) if part == "uniform" else (last, tuple(genome))
    evaluator = SerialEvaluator(
        session.model, session.adapter, store, None, eval_tokens, mode=cfg.search.realisation, batch_size=bs
    )
    try:
        evaluator.apply(chosen)  # the chosen genome is re-applied before any final number is computed
        return {
            "ppl": perplexity(session.model, eval_tokens, batch_size=bs),
            "kl": sparse_kl(session.model, eval_tokens, values, indices, batch_size=bs),
            "prunable_params": sum(
                store.level_entry(g, lv).params for g, lv in zip(genes, chosen, strict=True)
            ),
        }
    finally:
        evaluator.close()
