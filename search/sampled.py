"""Sampler baselines: random search and Optuna (TPE) over per-gene ladder positions, projected onto the budget.

The first trial is the start genome (every gene at its ladder centre); each further trial proposes a
fractional ladder position per gene; :func:`search.baselines.project_units` turns it
into the nearest feasible genome (exact per-type unit counts), which is scored on one fixed calibration batch
(`tyr.search.batch.Batch`).
Both samplers run through an Optuna study stored in a journal file, so a killed search resumes where it
stopped: trials left RUNNING by the killed process are marked FAILED and redone, and the sampler is re-seeded
from (seed, completed trials) before every batch, which makes a resumed search propose exactly what an
uninterrupted one would. (A kill inside the milliseconds in which a scored batch is told to the journal can
leave a partial batch; the resumed search is then still valid but may differ from an uninterrupted one. An
append cut short, by a kill or a full disk, leaves a torn last line: it is dropped on open, with a warning.)

TPE is used rather than CMA-ES: Optuna's CMA-ES sampler keeps its state as pickled bytes inside the study,
and Tyr never stores pickles.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tyr.errors import TyrError
from tyr.io import atomic_write_text
from tyr.search.baselines import project_units, units_at
from tyr.search.batch import Batch, as_batch
from tyr.search.counters import IOCounters, io_counters
from tyr.search.evolution import FitnessFn
from tyr.search.space import Genome, SearchSpace

SAMPLERS = ("random", "tpe")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampledResult:
    genome: Genome
    fitness: float
    evaluations: int  # completed trials
    batches: int


def sampled_search(
    space: SearchSpace,
    fitness: FitnessFn,
    *,
    sampler: str,
    num_evaluations: int,
    batch_size: int,
    indices: np.ndarray | Batch,
    seed: int,
    journal_path: str | Path,
    history_path: str | Path,
    identity: str,
    tokens_per_evaluation: int = 0,
    on_batch: Callable[[int, int, float, float], None] | None = None,
) -> SampledResult:
    """Run (or resume) ``num_evaluations`` trials in batches of ``batch_size``; returns the best genome.

    ``indices`` is the calibration batch every trial is scored on (a `Batch`, or sequence indices scored whole).
    ``identity`` pins the study to its run, supernet and iteration; a journal holding another identity is
    refused. ``on_batch(batch, done, best, seconds)`` is called after each batch. Each history line carries the
    batch's I/O counters (`io`, as the evolution's).
    """
    optuna = _import_optuna()
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if num_evaluations < 1 or batch_size < 1:
        raise TyrError(
            f"need at least one evaluation and batch size >= 1, got {num_evaluations}, {batch_size}"
        )
    fixed = as_batch(indices)
    study = _open_study(optuna, Path(journal_path), identity)
    _fail_interrupted(optuna, study)
    distributions = {
        f"g{g}": optuna.distributions.FloatDistribution(float(lad.levels[0]), float(lad.levels[-1]))
        for g, lad in enumerate(space.ladders)
        if len(lad.levels) > 1
    }
    # the batches told so far (a trial records its batch: the last one may be smaller than batch_size)
    batch = max((int(t.user_attrs.get("batch", 0)) for t in _completed(optuna, study)), default=0)
    while (done := len(_completed(optuna, study))) < num_evaluations:
        t0 = time.perf_counter()
        if done == 0 and not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            # the first trial is the start (ladder centres), so the best is never worse than not searching,
            # as the evolution's parent guarantees for it
            study.enqueue_trial({name: 0.0 for name in distributions})
        study.sampler = _sampler(optuna, sampler, seed, done)
        trials = [study.ask(distributions) for _ in range(min(batch_size, num_evaluations - done))]
        genomes = [_genome(space, trial.params) for trial in trials]
        io0 = io_counters(fitness)
        values = _score(fitness, genomes, fixed)
        io = (io_counters(fitness) - io0).to_json()
        batch += 1
        for trial, genome, value in zip(trials, genomes, values, strict=True):
            trial.set_user_attr("genome", list(genome))
            trial.set_user_attr("batch", batch)
            trial.set_user_attr("io", io)  # the batch's I/O (every trial of the batch holds the same)
            study.tell(trial, value if math.isfinite(value) else None, state=_state(optuna, value))
        seconds = time.perf_counter() - t0
        _write_history(optuna, study, history_path, tokens_per_evaluation)
        if on_batch is not None:
            on_batch(batch, len(_completed(optuna, study)), _best(optuna, study)[1], seconds)
    _write_history(optuna, study, history_path, tokens_per_evaluation)
    genome, best = _best(optuna, study)
    return SampledResult(genome, best, len(_completed(optuna, study)), batch)


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise TyrError("search.method random/optuna needs Optuna: pip install 'tyr-pruner[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _open_study(optuna, journal_path: Path, identity: str):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal_path.parent.mkdir(parents=True, exist_ok=True)
    repair_journal(journal_path)
    storage = JournalStorage(JournalFileBackend(str(journal_path)))
    study = optuna.create_study(storage=storage, study_name="tyr", direction="minimize", load_if_exists=True)
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
    elif stored != identity:
        raise TyrError(
            f"{journal_path} belongs to another search (other config or supernet); delete it to start over"
        )
    return study


def repair_journal(path: Path) -> None:
    """Drop a torn last record from an Optuna journal (one JSON object per line, each append fsynced).

    A process killed (or a disk filled) in the middle of an append leaves a last line that is not JSON; that
    append never completed, so dropping it loses nothing the search relies on: the trials it would have
    recorded are redone on resume. A bad line anywhere else is corruption Tyr cannot repair: TyrError.
    """
    if not path.is_file():
        return
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # what follows the last newline: b"" unless the last append was cut short
    bad = [i for i, line in enumerate(lines) if not _is_json(line)]
    if bad and (bad[0] < len(lines) - 1 or tail):  # a bad line that is not the last one
        raise TyrError(
            f"{path} is corrupt (line {bad[0] + 1} is not a JSON record); delete the folder {path.parent} to "
            "redo this iteration's search"
        )
    if not bad and not tail:
        return
    good = len(data) - len(tail) - (len(lines[-1]) + 1 if bad else 0)  # bytes of the complete, valid records
    logger.warning(
        "%s: dropping a torn last record (%d bytes) left by an append that never completed; its trials are redone",
        path,
        len(data) - good,
    )
    with open(path, "r+b") as f:
        f.truncate(good)
        f.flush()
        os.fsync(f.fileno())


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False
    return True


def _fail_interrupted(optuna, study) -> None:
    """Trials a killed process left RUNNING are failed; their batch is redone with the same seed."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def _completed(optuna, study) -> list:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _sampler(optuna, name: str, seed: int, done: int):
    batch_seed = int(np.random.SeedSequence([seed, done]).generate_state(1)[0])
    if name == "random":
        return optuna.samplers.RandomSampler(seed=batch_seed)
    return optuna.samplers.TPESampler(seed=batch_seed)


def _genome(space: SearchSpace, params: dict) -> Genome:
    positions = [params.get(f"g{g}", float(lad.levels[0])) for g, lad in enumerate(space.ladders)]
    return project_units(space, units_at(space, positions))


def _score(fitness: FitnessFn, genomes: Sequence[Genome], batch: Batch) -> list[float]:
    """Fitness of each distinct genome once (projection often maps proposals to the same genome)."""
    unique = list(dict.fromkeys(genomes))
    values = dict(zip(unique, (float(v) for v in fitness(unique, batch)), strict=True))
    return [values[g] for g in genomes]


def _state(optuna, value: float):
    return optuna.trial.TrialState.COMPLETE if math.isfinite(value) else optuna.trial.TrialState.FAIL


def _best(optuna, study) -> tuple[Genome, float]:
    trials = _completed(optuna, study)
    if not trials:
        raise TyrError("the sampled search has no completed trial (every fitness was NaN?)")
    best = min(trials, key=lambda t: (t.value, t.number))
    return tuple(int(v) for v in best.user_attrs["genome"]), float(best.value)


def _write_history(optuna, study, path: str | Path, tokens_per_evaluation: int) -> None:
    """history.jsonl rebuilt from the journal: one line per batch, fitness = best so far (same keys as the EA)."""
    by_batch: dict[int, list] = {}
    for trial in _completed(optuna, study):
        by_batch.setdefault(int(trial.user_attrs["batch"]), []).append(trial)
    lines, best = [], math.inf
    for batch in sorted(by_batch):
        trials = by_batch[batch]
        best_trial = min(trials, key=lambda t: (t.value, t.number))
        best = min(best, best_trial.value)
        seconds = max(  # a batch's trials are scored together: its wall time is the longest trial's
            (
                (t.datetime_complete - t.datetime_start).total_seconds()
                for t in trials
                if t.datetime_complete and t.datetime_start
            ),
            default=0.0,
        )
        lines.append(
            json.dumps(
                {
                    "generation": batch,
                    "fitness": best,
                    "parent": best_trial.user_attrs["genome"],
                    "num_evaluations": len(trials),
                    "num_tokens": len(trials) * tokens_per_evaluation,
                    "seconds": round(seconds, 6),
                    "io": IOCounters.from_json(best_trial.user_attrs.get("io", {})).to_json(),
                },
                sort_keys=True,
            )
        )
    atomic_write_text(path, "".join(line + "\n" for line in lines))
