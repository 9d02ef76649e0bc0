"""Search core: space/budget, mutation, selection, generations, convergence, checkpoint/resume."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest

from tyr.errors import TyrError
from tyr.search.batch import Batch, stage_batch
from tyr.search.counters import IOCounters
from tyr.search.evolution import (
    EvolutionConfig,
    Stage,
    mutate,
    run_generation,
    sample_offspring,
    select_survivors,
)
from tyr.search.space import Budget, GeneLadder, SearchSpace, budget_for_start
from tyr.search.state import SearchState, evolve, load_state, make_rng, restore_rng, save_state
from tyr.supernet.variant import Gene, genes_of

NUM_LAYERS = 6
LEVELS = tuple(range(-4, 5))
HIDDEN, HEAD_DIM = 64, 8


def attn_params(heads: int) -> int:
    kv = math.ceil(heads / 4)  # GQA-like: one KV head per 4 query heads -> non-linear in heads
    return 2 * heads * HEAD_DIM * HIDDEN + 2 * kv * HEAD_DIM * HIDDEN


def mlp_params(channels: int) -> int:
    return 3 * HIDDEN * channels


def make_ladders(num_layers: int = NUM_LAYERS, levels: tuple[int, ...] = LEVELS) -> list[GeneLadder]:
    out = []
    for gene in genes_of(num_layers):
        if gene.kind == "attn":
            units = tuple(10 - lv for lv in levels)
            params = tuple(attn_params(u) for u in units)
        else:
            units = tuple(100 - 8 * lv for lv in levels)
            params = tuple(mlp_params(u) for u in units)
        out.append(GeneLadder(gene, levels, units, params))
    return out


def make_space(mode: str = "per_type", start=None, **kw) -> SearchSpace:
    ladders = make_ladders(**kw)
    start = start if start is not None else (0,) * len(ladders)
    return SearchSpace(ladders, budget_for_start(ladders, start, mode))


# Hidden optimum: per kind the levels sum to 0, so it keeps the start's unit counts exactly.
OPTIMUM = (2, -1, -2, 2, 1, 0, -1, -2, 0, 1, 0, 0)
WEIGHTS = np.linspace(1.0, 2.0, len(OPTIMUM))


def true_loss(genome) -> float:
    return float(np.sum(WEIGHTS * (np.asarray(genome) - np.asarray(OPTIMUM)) ** 2))


class SyntheticFitness:
    """Weighted distance to the hidden optimum plus noise seeded by (genome, batch), never by call order."""

    def __init__(self, noise: float = 0.3):
        self.noise = noise
        self.calls = 0

    def __call__(self, genomes, batch):
        self.calls += 1
        assert isinstance(batch, Batch)
        idx = np.asarray(batch.sequences, dtype=np.int64)
        assert np.all(np.diff(idx) > 0), "sequence indices must be sorted and distinct"
        seed = idx.tolist() if batch.num_positions is None else (idx.tolist(), batch.num_positions)
        out = []
        for g in genomes:
            h = hashlib.sha256(repr((tuple(g), seed)).encode()).digest()
            noise = np.random.default_rng(int.from_bytes(h[:8], "little")).normal() / math.sqrt(len(idx))
            out.append(true_loss(g) + self.noise * noise)
        return out


CONFIG = EvolutionConfig(
    num_generations=12,
    num_offspring=12,
    stages=(Stage(6, 256), Stage(3, 1024), Stage(1, 4096)),
    max_mutations=3,
)


# -- space ----------------------------------------------------------------------------------------------------


def test_space_basics_and_budget_for_start():
    space = make_space("per_type")
    zero = (0,) * 12
    assert space.num_genes == 12 and space.genes == tuple(genes_of(NUM_LAYERS))
    assert space.units(zero, "attn") == 60 and space.units(zero, "mlp") == 600
    assert space.params(zero) == space.budget.max_params
    assert space.budget.units == {"attn": 60, "mlp": 600}
    assert space.is_feasible(zero)
    assert space.has_level(0, 4) and not space.has_level(0, 5)
    assert not space.is_feasible((5,) + (0,) * 11)  # level missing
    assert not space.is_feasible((0,) * 11)  # wrong length
    assert not space.is_feasible((1,) + (0,) * 11)  # per_type: attn units differ
    # per_type: equal units but more params (GQA rounding): 9+9+9+13 heads keep 13 KV heads instead of 12
    g = (1, 0, 1, 0, 1, 0, -3, 0, 0, 0, 0, 0)
    assert space.units(g, "attn") == 60 and space.params(g) > space.budget.max_params
    assert not space.is_feasible(g)
    g = (-1, 0, 1) + (0,) * 9  # 11 + 9 heads: same units, same params
    assert space.is_feasible(g) and space.params(g) == space.params(zero)
    joint = make_space("joint")
    assert joint.budget.units is None
    assert joint.is_feasible((0, 1) + (0,) * 10)  # sparser mlp: fewer params
    assert not joint.is_feasible((0, -1) + (0,) * 10)


def test_space_rejects_malformed_ladders():
    gene = Gene(0, "attn")
    with pytest.raises(ValueError, match="contiguous"):
        GeneLadder(gene, (-1, 1), (3, 1), (3, 1))
    with pytest.raises(ValueError, match="centre"):
        GeneLadder(gene, (1, 2), (3, 1), (3, 1))
    with pytest.raises(ValueError, match="strictly decrease"):
        GeneLadder(gene, (0, 1), (3, 3), (3, 1))
    with pytest.raises(ValueError, match="increase"):
        GeneLadder(gene, (0, 1), (3, 2), (1, 3))
    with pytest.raises(ValueError, match="levels but"):
        GeneLadder(gene, (0, 1), (3, 2, 1), (3, 1))
    lad = make_ladders()
    with pytest.raises(ValueError, match="canonical order"):
        SearchSpace([lad[1], lad[0]], Budget("joint", 10**9))
    with pytest.raises(ValueError, match="per_type budget"):
        SearchSpace(lad, Budget("per_type", 10**9, {"attn": 60}))
    with pytest.raises(ValueError, match="joint budget"):
        SearchSpace(lad, Budget("joint", 10**9, {"attn": 60, "mlp": 600}))


# -- mutation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["per_type", "joint"])
def test_chained_mutations_respect_budget(mode):
    space = make_space(mode)
    rng = make_rng(1)
    genome = (0,) * 12
    units0 = {k: space.units(genome, k) for k in ("attn", "mlp")}
    for _ in range(1000):
        child = mutate(genome, space, rng, max_mutations=4)
        assert len(child) == 12 and all(isinstance(v, int) for v in child)
        assert all(space.has_level(i, v) for i, v in enumerate(child))
        assert space.params(child) <= space.budget.max_params
        if mode == "per_type":
            assert {k: space.units(child, k) for k in units0} == units0
        assert space.is_feasible(child)
        genome = child
    assert genome != (0,) * 12


def test_mutation_count_distribution():
    space = make_space("per_type", num_layers=40)  # many genes: switches rarely cancel
    rng = make_rng(2)
    changed = [sum(abs(v) for v in mutate((0,) * 80, space, rng, max_mutations=4)) for _ in range(4000)]
    # n = min(U{1..4}, U{1..4}): P(n=1) = 7/16, E[n] = 30/16; each switch changes two genes by one level
    assert min(changed) >= 2 and max(changed) <= 8
    assert abs(np.mean(np.array(changed) == 2) - 7 / 16) < 0.04
    assert abs(np.mean(changed) / 2 - 30 / 16) < 0.1


def test_offspring_unique_and_differ_from_parent():
    space = make_space("per_type")
    rng = make_rng(3)
    parent = (0,) * 12
    kids = sample_offspring(parent, space, rng, num_offspring=50, max_mutations=4)
    assert len(kids) == 50 and len(set(kids)) == 50
    assert parent not in kids and all(space.is_feasible(k) for k in kids)
    kids = sample_offspring(parent, space, rng, num_offspring=20, max_mutations=4, max_level_distance=1)
    assert all(max(abs(v) for v in k) <= 1 for k in kids)


def test_infeasible_offspring_requests_raise():
    # ladder -1..1 on 2 layers (2 attn + 2 mlp genes), per_type: only 4 distinct children at distance 1
    space = make_space("per_type", num_layers=2, levels=(-1, 0, 1))
    rng = make_rng(4)
    kids = sample_offspring((0,) * 4, space, rng, num_offspring=4, max_mutations=1, max_tries=200)
    assert sorted(kids) == sorted([(-1, 0, 1, 0), (1, 0, -1, 0), (0, -1, 0, 1), (0, 1, 0, -1)])
    with pytest.raises(TyrError, match="unique feasible offspring"):
        sample_offspring((0,) * 4, space, rng, num_offspring=5, max_mutations=1, max_tries=200)
    # one gene per kind: no level switch keeps the unit counts
    single = make_space("per_type", num_layers=1)
    with pytest.raises(TyrError, match="no level switch"):
        sample_offspring((0, 0), single, rng, num_offspring=1, max_mutations=1)
    # infeasible parent
    with pytest.raises(TyrError, match="not feasible"):
        sample_offspring((1,) + (0,) * 11, make_space("per_type"), rng, num_offspring=1, max_mutations=1)


# -- selection / generation -----------------------------------------------------------------------------------


def test_select_survivors_stable():
    assert select_survivors([3.0, 1.0, 2.0, 1.0, 0.5], 3) == [4, 1, 3]
    assert select_survivors([1.0, 1.0, 1.0], 2) == [0, 1]
    assert select_survivors([float("nan"), 2.0], 1) == [1]
    assert select_survivors([2.0], 0) == []


def test_run_generation_best_of_last_stage_and_accounting():
    space = make_space("per_type")
    fit = SyntheticFitness()
    calls = []

    def recording(genomes, batch):
        vals = fit(genomes, batch)
        calls.append((list(genomes), batch, vals))
        return vals

    parent = (0,) * 12
    res = run_generation(parent, space, CONFIG, recording, make_rng(5), num_sequences=10, seq_len=128)
    assert [len(c[0]) for c in calls] == [12, 6, 4]  # parent joins only the last stage
    assert [len(c[1].sequences) for c in calls] == [2, 8, 10]  # ceil(tokens/seq_len), capped at num_sequences
    assert all(c[1].num_positions is None for c in calls)  # whole sequences
    assert parent not in calls[0][0] and calls[2][0][-1] == parent
    last_genomes, _, last_vals = calls[2]
    assert res.parent == last_genomes[int(np.argmin(last_vals))]
    assert res.fitness == min(last_vals) == res.stage_best[-1]
    assert res.num_evaluations == 22
    assert res.num_tokens_evaluated == (12 * 2 + 6 * 8 + 4 * 10) * 128
    # survivors of stage 1 are the best of stage 0
    order = select_survivors(calls[0][2], 6)
    assert calls[1][0] == [calls[0][0][i] for i in order]


def test_a_stage_shorter_than_a_sequence_scores_a_prefix_of_the_same_draw():
    """Stage tokens below seq_len score a prefix of one sequence; the RNG draws are those of whole sequences."""
    a, b = make_rng(3), make_rng(3)
    prefix, whole = stage_batch(a, 48, 10, 128), stage_batch(b, 128, 10, 128)
    assert prefix == Batch(whole.sequences, 48) and whole.num_positions is None
    assert prefix.num_tokens(128) == 48 and whole.num_tokens(128) == 128
    assert a.bit_generator.state == b.bit_generator.state
    assert stage_batch(make_rng(3), 300, 10, 128) == Batch(stage_batch(make_rng(3), 384, 10, 128).sequences)

    config = EvolutionConfig(num_generations=1, num_offspring=6, stages=(Stage(3, 64), Stage(1, 256)))
    seen = []

    def recording(genomes, batch):
        seen.append(batch)
        return SyntheticFitness()(genomes, batch)

    res = run_generation(
        (0,) * 12, make_space(), config, recording, make_rng(5), num_sequences=10, seq_len=128
    )
    assert [(len(bt.sequences), bt.num_positions) for bt in seen] == [(1, 64), (2, None)]
    assert res.num_tokens_evaluated == 6 * 64 + 4 * 256


def test_batch_values():
    assert Batch(np.array([3, 1])).sequences == (3, 1)  # arrays in, a hashable tuple kept
    assert Batch((1, 2), 5) == Batch.from_json(Batch((1, 2), 5).to_json())
    assert Batch((1,)).positions(32) == 32 and Batch((1,), 8).positions(32) == 8
    for bad in [
        dict(sequences=()),
        dict(sequences=(1,), num_positions=0),
        dict(sequences=(1,), num_positions=1.5),
    ]:
        with pytest.raises(TyrError):
            Batch(**bad)
    with pytest.raises(TyrError, match="positions"):
        Batch((1,), 64).positions(32)


class CountingIO(SyntheticFitness):
    """A backend with I/O counters: one file hashed on its first call only, fixed costs per candidate."""

    def __init__(self):
        super().__init__()
        self.io_counters = IOCounters()

    def __call__(self, genomes, batch):
        first = IOCounters(num_variant_files_hashed=7) if self.calls == 0 else IOCounters()
        per = IOCounters(variant_bytes_read=10, teacher_bytes_read=1, num_genes_swapped=2)
        self.io_counters = (
            self.io_counters + first + IOCounters(*(len(genomes) * v for v in per.to_json().values()))
        )
        return super().__call__(genomes, batch)


def test_history_lines_carry_each_generations_io(tmp_path):
    config = EvolutionConfig(num_generations=3, num_offspring=6, stages=(Stage(3, 128), Stage(1, 512)))
    kw = dict(num_sequences=8, seq_len=128)
    evolve(
        make_space(), config, CountingIO(), (0,) * 12, 1, tmp_path / "s.json", tmp_path / "h.jsonl", {}, **kw
    )
    ios = [json.loads(line)["io"] for line in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert [io["num_variant_files_hashed"] for io in ios] == [7, 0, 0]  # only in the first generation
    assert all(io["variant_bytes_read"] == 10 * 10 and io["num_genes_swapped"] == 2 * 10 for io in ios)
    assert set(ios[0]) == {
        "variant_bytes_read",
        "num_variant_files_hashed",
        "teacher_bytes_read",
        "num_genes_swapped",
    }


def test_parent_kept_when_children_worse():
    space = make_space("per_type")
    parent = (0,) * 12

    def parent_best(genomes, idx):
        return [0.0 if g == parent else 1.0 + sum(map(abs, g)) for g in genomes]

    res = run_generation(parent, space, CONFIG, parent_best, make_rng(6), num_sequences=64, seq_len=128)
    assert res.parent == parent and res.fitness == 0.0


def test_config_validate():
    CONFIG.validate()
    bad = [
        dict(num_generations=0),
        dict(num_offspring=4),  # stage 0 keeps 6
        dict(stages=(Stage(6, 256), Stage(6, 1024), Stage(1, 4096))),
        dict(stages=(Stage(6, 256), Stage(2, 1024))),
        dict(stages=(Stage(6, 2048), Stage(1, 1024))),
        dict(stages=()),
        dict(stages=(Stage(1, 0),)),
        dict(max_mutations=0),
        dict(max_level_distance=0),
    ]
    base = dict(
        num_generations=CONFIG.num_generations,
        num_offspring=CONFIG.num_offspring,
        stages=CONFIG.stages,
        max_mutations=CONFIG.max_mutations,
    )
    for override in bad:
        with pytest.raises(TyrError):
            EvolutionConfig(**{**base, **override}).validate()


# -- convergence ----------------------------------------------------------------------------------------------


def test_ea_converges_toward_optimum():
    space = make_space("per_type")
    fit = SyntheticFitness(noise=0.3)
    config = EvolutionConfig(
        num_generations=60, num_offspring=16, stages=(Stage(4, 512), Stage(1, 2048)), max_mutations=3
    )
    rng = make_rng(7)
    parent = (0,) * 12
    start_loss = true_loss(parent)
    losses = []
    for _ in range(config.num_generations):
        parent = run_generation(parent, space, config, fit, rng, num_sequences=32, seq_len=128).parent
        losses.append(true_loss(parent))
        assert space.is_feasible(parent)
    assert losses[-1] < 0.15 * start_loss, (start_loss, losses)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


# -- checkpoint / resume --------------------------------------------------------------------------------------

IDENTITY = {"config_hash": "abc", "supernet_fingerprint": "f00"}


def _run(tmp, config=CONFIG, stop_after=None, seed=11, identity=IDENTITY, **options):
    """evolve() on the synthetic fitness, stopped after `stop_after` generations; (state, generations done)."""
    done = []
    state = evolve(
        make_space("per_type"),
        config,
        SyntheticFitness(),
        (0,) * 12,
        seed,
        tmp / "state.json",
        tmp / "history.jsonl",
        identity,
        num_sequences=16,
        seq_len=128,
        on_generation=lambda g, r, s: done.append(g),
        should_stop=None if stop_after is None else (lambda: len(done) >= stop_after),
        **options,
    )
    return state, done


def _history(tmp):
    lines = (tmp / "history.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    for r in recs:
        assert r.pop("seconds") >= 0
    return recs


def test_evolve_deterministic_and_resume_equivalent(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    full, done = _run(a)
    assert full.generation == CONFIG.num_generations and done == list(range(1, 13))
    hist = _history(a)
    assert [r["generation"] for r in hist] == list(range(1, 13))
    assert tuple(hist[-1]["parent"]) == full.parent and hist[-1]["fitness"] == full.parent_fitness
    assert full.best_history == [r["fitness"] for r in hist]
    assert true_loss(full.parent) < true_loss((0,) * 12)

    # interrupted via should_stop after 5 generations, then resumed by a new call
    part, done = _run(b, stop_after=5)
    assert part.generation == 5 and done == [1, 2, 3, 4, 5]
    assert load_state(b / "state.json", IDENTITY).generation == 5
    resumed, done = _run(b)
    assert done == list(range(6, 13))
    assert resumed.parent == full.parent and resumed.parent_fitness == full.parent_fitness
    assert resumed.best_history == full.best_history and resumed.rng_state == full.rng_state
    assert _history(b) == hist

    # crash after the history append of generation 8 but before its state save: state is still generation 7
    _run(c, stop_after=7)
    shutil.copy(c / "state.json", tmp_path / "state7.json")
    _run(c, stop_after=1)  # runs generation 8
    shutil.copy(tmp_path / "state7.json", c / "state.json")
    with open(c / "history.jsonl", "a") as f:
        f.write('{"generation": 9, "fitn')  # plus a torn line
    assert len((c / "history.jsonl").read_text().splitlines()) == 9
    resumed, done = _run(c)
    assert done == list(range(8, 13))
    assert resumed.parent == full.parent and resumed.parent_fitness == full.parent_fitness
    assert _history(c) == hist

    # nothing more to do once finished; extending num_generations continues
    again, done = _run(a)
    assert done == [] and again.parent == full.parent
    more, done = _run(a, config=EvolutionConfig(**{**CONFIG.__dict__, "num_generations": 14}))
    assert done == [13, 14] and more.generation == 14


def test_different_seed_differs(tmp_path):
    s1, _ = _run(tmp_path / "a", seed=1)
    s2, _ = _run(tmp_path / "b", seed=2)
    assert s1.rng_state != s2.rng_state
    with pytest.raises(TyrError, match="seed"):
        _run(tmp_path / "a", seed=2)


def test_identity_mismatch_and_corrupt_state(tmp_path):
    _run(tmp_path, stop_after=2)
    path = tmp_path / "state.json"
    with pytest.raises(TyrError, match="config_hash.*delete .* to redo this search"):
        load_state(path, {**IDENTITY, "config_hash": "other"})
    with pytest.raises(TyrError, match="config_hash"):
        _run(tmp_path, identity={**IDENTITY, "config_hash": "other"})
    assert load_state(tmp_path / "missing.json", IDENTITY) is None

    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(TyrError, match="not valid JSON"):
        load_state(path, IDENTITY)
    for broken in [
        {k: v for k, v in good.items() if k != "parent"},
        {**good, "generation": -1},
        {**good, "generation": "2"},
        {**good, "parent": [0, "x"]},
        {**good, "rng_state": {"bit_generator": "MT19937"}},
        {**good, "rng_state": {"bit_generator": "PCG64", "state": "nope"}},
        {**good, "best_history": ["a"]},
        [1, 2, 3],
    ]:
        path.write_text(json.dumps(broken))
        with pytest.raises(TyrError, match="corrupt"):
            load_state(path, IDENTITY)


def test_state_roundtrip_and_rng(tmp_path):
    rng = make_rng(3)
    rng.random(5)
    st = SearchState(4, (1, -1, 0), 0.25, rng.bit_generator.state, {"a": [1, 2]}, [1.0, 0.5], seed=3)
    save_state(tmp_path / "s.json", st)
    back = load_state(tmp_path / "s.json", {"a": (1, 2)})  # tuple vs list: same identity after JSON
    assert back == st
    assert restore_rng(back.rng_state).random() == rng.random()
    assert SearchState.from_json(st.to_json()) == st


# -- paired selection -----------------------------------------------------------------------------------------

PAIRED = EvolutionConfig(**{**CONFIG.__dict__, "selection": "paired"})


def _recording(fitness):
    calls = []

    def recording(genomes, batch):
        values = fitness(genomes, batch)
        calls.append((list(genomes), batch, values))
        return values

    return recording, calls


def test_paired_selection_replaces_the_parent_only_by_a_child_that_beat_it_on_the_same_batch():
    space = make_space("per_type")
    rng, parent, replaced = make_rng(8), (0,) * 12, 0
    for _ in range(40):
        recording, calls = _recording(SyntheticFitness(noise=1.0))
        res = run_generation(parent, space, PAIRED, recording, rng, num_sequences=16, seq_len=128)
        for s, (genomes, _, _values) in enumerate(calls):
            assert genomes[-1] == parent and parent not in genomes[:-1]  # the parent beside its children
            if s > 0:  # only children that beat the parent on the previous stage's batch go on
                previous_genomes, _, previous = calls[s - 1]
                assert all(previous[previous_genomes.index(g)] < previous[-1] for g in genomes[:-1])
        genomes, _, values = calls[-1]
        if res.parent != parent:
            assert len(calls) == len(PAIRED.stages) and res.replaced
            assert res.fitness == values[genomes.index(res.parent)] < values[-1]
            replaced += 1
        else:
            assert not res.replaced and res.fitness == values[-1]
            assert all(v >= values[-1] for v in values[:-1]) or len(calls) == len(PAIRED.stages)
        assert res.num_evaluations == sum(len(g) for g, _, _ in calls)
        parent = res.parent
    assert 0 < replaced < 40


def test_paired_selection_stops_when_every_child_loses():
    space, parent = make_space("per_type"), (0,) * 12
    recording, calls = _recording(lambda genomes, b: [0.0 if g == parent else 1.0 for g in genomes])
    res = run_generation(parent, space, PAIRED, recording, make_rng(6), num_sequences=64, seq_len=128)
    assert len(calls) == 1 and len(calls[0][0]) == PAIRED.num_offspring + 1  # the costlier stages are skipped
    assert res.parent == parent and res.fitness == 0.0 and not res.replaced and res.num_evaluations == 13
    # a tie is no win: legacy lets a child win it, paired keeps the parent
    flat = lambda genomes, b: [1.0] * len(genomes)  # noqa: E731
    assert run_generation(parent, space, CONFIG, flat, make_rng(6), 64, 128).parent != parent
    assert run_generation(parent, space, PAIRED, flat, make_rng(6), 64, 128).parent == parent


def test_selection_rules_draw_the_same_offspring_and_batches():
    """Both rules consume the generator identically whatever the fitness values (stages may be skipped)."""
    space = make_space("per_type")
    for fitness in (SyntheticFitness(), lambda genomes, b: [0.0] * len(genomes)):
        rngs = {name: make_rng(9) for name in ("legacy", "paired")}
        first = {}
        for name, rng in rngs.items():
            recording, calls = _recording(fitness)
            config = CONFIG if name == "legacy" else PAIRED
            run_generation((0,) * 12, space, config, recording, rng, num_sequences=16, seq_len=128)
            first[name] = (calls[0][0][: config.num_offspring], calls[0][1])
        assert first["legacy"] == first["paired"]
        assert rngs["legacy"].bit_generator.state == rngs["paired"].bit_generator.state


def test_selection_rule_is_checked():
    with pytest.raises(TyrError, match="selection must be one of"):
        EvolutionConfig(**{**CONFIG.__dict__, "selection": "best"}).validate()


# -- validation in the search loop ----------------------------------------------------------------------------


class CountingValidator:
    """Validation KL = true loss + `offset` for the genomes in `worse`; counts its calls."""

    def __init__(self, worse=(), offset=0.0):
        self.calls, self.worse, self.offset = 0, set(worse), offset

    def __call__(self, genomes):
        self.calls += 1
        return [true_loss(g) + (self.offset if tuple(g) in self.worse else 0.0) for g in genomes]


def _validated_run(tmp, validator, every, stop_after=None, config=PAIRED):
    state, _ = _run(tmp, config, stop_after, validate=validator, validate_every=every)
    return state


def test_evolve_records_validation_and_keeps_the_best_measured_genome(tmp_path):
    validator = CountingValidator()
    state = _validated_run(tmp_path / "a", validator, every=5)
    history = _history(tmp_path / "a")
    measured = {r["generation"]: r["validation_kl"] for r in history if "validation_kl" in r}
    assert sorted(measured) == [5, 10, 12]  # every 5 generations and the last one
    assert all(measured[g] == true_loss(history[g - 1]["parent"]) for g in measured)
    assert state.start_validated.generation == 0 and state.start_validated.validation_kl == true_loss(
        (0,) * 12
    )
    candidates = [state.start_validated.validation_kl, *measured.values()]
    assert state.best_validated.validation_kl == min(candidates)
    assert validator.calls <= 4  # a parent measured before is not measured again
    # the search itself is untouched by validation: same parents as without it
    plain, _ = _run(tmp_path / "b", config=PAIRED)
    assert plain.parent == state.parent and plain.rng_state == state.rng_state
    assert plain.best_validated is None and "best_validated" not in plain.to_json()

    # resumed after a stop: the same measurements and the same best
    _validated_run(tmp_path / "c", CountingValidator(), every=5, stop_after=7)
    resumed = _validated_run(tmp_path / "c", CountingValidator(), every=5)
    assert resumed == state and _history(tmp_path / "c") == history


def test_evolve_keeps_the_start_when_every_parent_validates_worse(tmp_path):
    everything_but_start = CountingValidator(offset=100.0)
    everything_but_start.worse = _AllBut((0,) * 12)
    state = _validated_run(tmp_path, everything_but_start, every=1)
    assert state.parent != (0,) * 12  # the search moved on calibration ...
    assert (
        state.best_validated.genome == (0,) * 12 and state.best_validated.generation == 0
    )  # ... not on validation
    assert SearchState.from_json(state.to_json()) == state


class _AllBut:
    def __init__(self, genome):
        self.genome = genome

    def __contains__(self, genome):
        return genome != self.genome
