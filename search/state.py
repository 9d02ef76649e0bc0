"""Search checkpoint (state.json + history.jsonl) and the resumable evolution loop.

The state saved after generation g holds the parent, its fitness and the RNG state *after* g, so a search killed
at any point and resumed gives exactly the result of an uninterrupted run. The history log is appended before
the state is saved; on resume, lines beyond the saved generation are dropped. Each history line carries the
fitness backend's I/O during that generation (`io`: see `tyr.search.counters.IOCounters`).

With a `validate` callable (held-out validation KL of genomes), the search also measures its start genome, its
parent every `validate_every` generations and its final parent, writes each value on its generation's history
line (`validation_kl`), and keeps the best of them in the state (`best_validated`). Validation draws nothing
from the generator and never steers the search; it decides which genome the caller takes as the result.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tyr.errors import TyrError
from tyr.io import append_line, atomic_write_json, atomic_write_text
from tyr.search.counters import io_counters
from tyr.search.evolution import EvolutionConfig, FitnessFn, GenerationResult, Genome, run_generation
from tyr.search.space import SearchSpace

STATE_VERSION = 1

# Validation KL of genomes (lower is better): one value per genome, on held-out calibration windows.
Validator = Callable[[Sequence[Genome]], list[float]]


def _fix(state_path: str | os.PathLike) -> str:
    """The remedy for a state that cannot be resumed (--force would change nothing: the config is the same)."""
    return f"delete {Path(state_path).parent} to redo this search from its start, or use a new --out"


@dataclass(frozen=True)
class Validated:
    """A genome the search measured on the validation windows."""

    generation: int  # after which generation it was the parent (0: the start genome)
    genome: Genome
    validation_kl: float
    fitness: float | None  # its search fitness in that generation (None for the start)

    def to_json(self) -> dict:
        return {
            "generation": self.generation,
            "genome": list(self.genome),
            "validation_kl": self.validation_kl,
            "fitness": self.fitness,
        }

    @classmethod
    def from_json(cls, d: Any) -> Validated:
        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if (
            not isinstance(d, dict)
            or not isinstance(d.get("generation"), int)
            or not isinstance(d.get("genome"), list)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in d["genome"])
            or not number(d.get("validation_kl"))
            or not (d.get("fitness") is None or number(d["fitness"]))
        ):
            raise TyrError(f"search state is corrupt: bad validated genome {str(d)[:80]}")
        fitness = d.get("fitness")
        return cls(
            d["generation"],
            tuple(d["genome"]),
            float(d["validation_kl"]),
            None if fitness is None else float(fitness),
        )


def better(candidate: Validated, best: Validated | None) -> bool:
    """Whether `candidate` has a strictly lower validation KL than `best` (NaN never does)."""
    return best is None or candidate.validation_kl < best.validation_kl or math.isnan(best.validation_kl)


@dataclass
class SearchState:
    generation: int  # number of completed generations
    parent: Genome
    parent_fitness: float | None
    rng_state: dict  # np.random.Generator.bit_generator.state
    identity: dict  # e.g. {"config_hash": ..., "supernet_fingerprint": ...}
    best_history: list[float] = field(default_factory=list)
    seed: int | None = None  # the seed the search started from (resume refuses a different one)
    # with validation: the start genome's measurement and the best measured genome so far (else None)
    start_validated: Validated | None = None
    best_validated: Validated | None = None

    def to_json(self) -> dict:
        out = {
            "version": STATE_VERSION,
            "generation": self.generation,
            "parent": list(self.parent),
            "parent_fitness": self.parent_fitness,
            "rng_state": self.rng_state,
            "identity": self.identity,
            "best_history": list(self.best_history),
            "seed": self.seed,
        }
        for key in ("start_validated", "best_validated"):  # absent without validation, as before it existed
            if getattr(self, key) is not None:
                out[key] = getattr(self, key).to_json()
        return out

    @classmethod
    def from_json(cls, d: Any) -> SearchState:
        """Parse and check a saved state; TyrError naming the bad field when it is corrupt."""

        def bad(what: str) -> TyrError:
            return TyrError(f"search state is corrupt: {what}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not isinstance(d, dict):
            raise bad(f"expected a JSON object, got {type(d).__name__}")
        missing = [
            k for k in ("generation", "parent", "parent_fitness", "rng_state", "identity") if k not in d
        ]
        if missing:
            raise bad(f"missing field(s) {missing}")
        if d.get("version", STATE_VERSION) != STATE_VERSION:
            raise bad(f"unsupported version {d.get('version')!r} (this Tyr writes {STATE_VERSION})")
        if not is_int(d["generation"]) or d["generation"] < 0:
            raise bad(f"'generation' must be a non-negative integer, got {d['generation']!r}")
        parent = d["parent"]
        if not isinstance(parent, list) or not parent or not all(is_int(v) for v in parent):
            raise bad("'parent' must be a non-empty list of integers")
        fit = d["parent_fitness"]
        if fit is not None and not is_num(fit):
            raise bad(f"'parent_fitness' must be a number or null, got {fit!r}")
        if not isinstance(d["rng_state"], dict):
            raise bad("'rng_state' must be an object")
        if not isinstance(d["identity"], dict):
            raise bad("'identity' must be an object")
        history = d.get("best_history", [])
        if not isinstance(history, list) or not all(is_num(v) for v in history):
            raise bad("'best_history' must be a list of numbers")
        seed = d.get("seed")
        if seed is not None and not is_int(seed):
            raise bad(f"'seed' must be an integer or null, got {seed!r}")
        validated = {
            key: None if d.get(key) is None else Validated.from_json(d[key])
            for key in ("start_validated", "best_validated")
        }
        state = cls(
            generation=d["generation"],
            parent=tuple(parent),
            parent_fitness=None if fit is None else float(fit),
            rng_state=d["rng_state"],
            identity=d["identity"],
            best_history=[float(v) for v in history],
            seed=seed,
            **validated,
        )
        try:
            restore_rng(state.rng_state)
        except TyrError as e:
            raise bad(str(e)) from None
        return state


def make_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def restore_rng(state_dict: dict) -> np.random.Generator:
    """A PCG64 generator continuing exactly from a saved `bit_generator.state`."""
    if not isinstance(state_dict, dict) or state_dict.get("bit_generator") != "PCG64":
        raise TyrError(f"saved RNG state is not a PCG64 state: {str(state_dict)[:80]}")
    bg = np.random.PCG64()
    try:
        bg.state = state_dict
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise TyrError(f"saved RNG state is invalid ({e})") from None
    return np.random.Generator(bg)


def _normalise(obj: Any) -> Any:
    """JSON round trip, so tuples and lists (and int/float keys) compare as they would after saving."""
    return json.loads(json.dumps(obj, sort_keys=True))


def save_state(path: str | os.PathLike, state: SearchState) -> None:
    atomic_write_json(path, state.to_json())


def load_state(path: str | os.PathLike, identity: dict) -> SearchState | None:
    """The saved state, or None when there is none; TyrError when it is corrupt or belongs to another search."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TyrError(f"cannot read search state {path}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TyrError(f"search state {path} is not valid JSON ({e}); {_fix(path)}") from None
    try:
        state = SearchState.from_json(data)
    except TyrError as e:
        raise TyrError(f"{path}: {e}; {_fix(path)}") from None
    saved, now = state.identity, _normalise(identity)
    diffs = [
        f"{key!r}: saved {saved.get(key, '<missing>')!r}, now {now.get(key, '<missing>')!r}"
        for key in sorted(set(saved) | set(now))
        if saved.get(key, "<missing>") != now.get(key, "<missing>")
    ]
    if diffs:
        raise TyrError(
            f"search state {path} belongs to a different search (" + "; ".join(diffs) + f"): {_fix(path)}"
        )
    return state


def truncate_history(path: str | os.PathLike, generation: int) -> None:
    """Drop history lines of generations after `generation` (and torn lines) so a resume does not repeat them."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            isinstance(rec, dict)
            and isinstance(rec.get("generation"), int)
            and rec["generation"] <= generation
        ):
            kept.append(line)
    if kept != lines:
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def evolve(
    space: SearchSpace,
    config: EvolutionConfig,
    fitness: FitnessFn,
    start: Genome,
    seed: int,
    state_path: str | os.PathLike,
    history_path: str | os.PathLike,
    identity: dict,
    *,
    num_sequences: int,
    seq_len: int,
    on_generation: Callable[[int, GenerationResult, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    validate: Validator | None = None,
    validate_every: int = 0,
) -> SearchState:
    """Run (or resume) the search up to `config.num_generations`; returns the last saved state.

    `identity` must pin everything the result depends on besides `seed` (config, supernet, calibration data);
    a saved state with a different identity or seed is refused. `should_stop()` is asked before each generation;
    when it returns True the state saved so far is returned. `on_generation(generation, result, seconds)` is
    called after each generation's state is saved.

    `validate(genomes)` (optional) measures the start genome, the parent after every `validate_every`-th
    generation (0: never) and after the last one; `state.best_validated` is the best of them (on a tie the
    earlier one).
    """
    config.validate()
    if isinstance(validate_every, bool) or not isinstance(validate_every, int) or validate_every < 0:
        raise TyrError(f"search: validate_every must be a non-negative integer, got {validate_every!r}")
    start = tuple(int(v) for v in start)
    if not space.is_feasible(start):
        raise TyrError(f"search: the start genome is not feasible: {space.describe(start)}")
    identity = _normalise(identity)
    state = _open_state(space, start, seed, state_path, identity)
    Path(history_path).parent.mkdir(parents=True, exist_ok=True)
    truncate_history(history_path, state.generation)
    # validation is deterministic: a genome measured before (the parent often survives) is not measured again
    known = {
        v.genome: v.validation_kl for v in (state.start_validated, state.best_validated) if v is not None
    }
    if validate is not None and state.start_validated is None:
        state.start_validated = Validated(0, start, _validation_kl(validate, start, known), None)
        if better(state.start_validated, state.best_validated):
            state.best_validated = state.start_validated
    rng = restore_rng(state.rng_state)
    while state.generation < config.num_generations:
        if should_stop is not None and should_stop():
            break
        t0, io0 = time.perf_counter(), io_counters(fitness)
        result = run_generation(state.parent, space, config, fitness, rng, num_sequences, seq_len)
        seconds = time.perf_counter() - t0
        io = (io_counters(fitness) - io0).to_json()
        generation = state.generation + 1
        record = {
            "generation": generation,
            "fitness": _json_float(result.fitness),
            "parent": list(result.parent),
            "num_evaluations": result.num_evaluations,
            "num_tokens": result.num_tokens_evaluated,
            "seconds": round(seconds, 6),
            "io": io,
        }
        best_validated = state.best_validated
        if validate is not None and (
            generation == config.num_generations or (validate_every and generation % validate_every == 0)
        ):
            measured = Validated(
                generation, result.parent, _validation_kl(validate, result.parent, known), result.fitness
            )
            record["validation_kl"] = _json_float(measured.validation_kl)
            if better(measured, best_validated):
                best_validated = measured
        append_line(history_path, json.dumps(record, sort_keys=True))
        state = SearchState(
            generation=generation,
            parent=result.parent,
            parent_fitness=result.fitness,
            rng_state=rng.bit_generator.state,
            identity=state.identity,
            best_history=[*state.best_history, result.fitness],
            seed=state.seed,
            start_validated=state.start_validated,
            best_validated=best_validated,
        )
        save_state(state_path, state)
        if on_generation is not None:
            on_generation(generation, result, seconds)
    return state


def _open_state(
    space: SearchSpace, start: Genome, seed: int, state_path: str | os.PathLike, identity: dict
) -> SearchState:
    """The saved state of this search (checked against it), or a fresh one at generation 0."""
    state = load_state(state_path, identity)
    if state is None:
        return SearchState(
            generation=0,
            parent=start,
            parent_fitness=None,
            rng_state=make_rng(seed).bit_generator.state,
            identity=identity,
            best_history=[],
            seed=int(seed),
        )
    if state.seed is not None and state.seed != seed:
        raise TyrError(
            f"search state {state_path} was started with seed {state.seed}, now seed {seed}: {_fix(state_path)}"
        )
    if not space.is_feasible(state.parent):
        raise TyrError(
            f"search state {state_path}: its parent is not feasible in this search space "
            f"({space.describe(state.parent)}): {_fix(state_path)}"
        )
    return state


def _validation_kl(validate: Validator, genome: Genome, known: dict[Genome, float]) -> float:
    """`genome`'s validation KL, measured unless `known` holds it (then remembered there)."""
    if genome not in known:
        values = validate([genome])
        if len(values) != 1:
            raise ValueError(f"validate returned {len(values)} values for 1 genome")
        known[genome] = float(values[0])
    return known[genome]
