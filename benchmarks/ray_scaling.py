"""Ray scaling of the search on the `paper` schedule: a scheduler simulation, an 8B end-to-end projection, and a
check of the simulation against a real local Ray run.

    python -m benchmarks.ray_scaling                 # all three (about half a minute)
    python -m benchmarks.ray_scaling --no-validate   # simulation and projection only (seconds)

(a) Simulation. Generations of the paper schedule (128 offspring drawn by the search's own `sample_offspring` on an
8B-shaped search space; stages (16, 2048), (4, 16384), (1, 131072) tokens at seq_len 4096 drawn by `stage_batch`;
the parent joins the last stage; survivors are drawn at random, as no fitness is computed) are run on N simulated
workers by the project's own scheduling code: `tyr.search.scheduling.WorkQueue` and `assign`, called the way
`tyr.cluster.ActorPool.evaluate` calls them (hand out calls, wait for the first answer, hand out again; every
worker runs its calls in order, `PIPELINE_DEPTH` in flight). A unit costs its gene swaps (genes that differ from
what the worker's model holds), its teacher rows (the first time the worker touches the block in a call) and its
forwards; a call adds a fixed cost and the latency there and back. Two policies:
  - whole: one unit = one candidate on the whole batch (the scheduling before work units);
  - units: one unit = one candidate on `batch_size` consecutive sequences (this release).
The serial reference runs `SerialEvaluator`'s order with the same costs (nearest-genome chain, every block of a
candidate in turn, each block's rows read once per call, no call overhead). Search efficiency = serial time /
(N x parallel time). Every cost is an estimate for Llama-3.1-8B pruned to 50% on H100s (`ASSUMPTIONS`, written
to the JSON), not a measurement: no GPU was used.
(b) End-to-end 8B speed-up on N workers: teacher pass + 4 supernet builds + 200 generations + final metrics,
with the teacher pass and the builds data-parallel on the N workers as this release runs them (tyr/cluster_build:
forwards and Hessians sharded, the shards' Hessians added by a pairwise tree on the workers, a gene's levels
pruned in groups over min(N, 9) workers which write their own files, every worker reading the variants), beside
the previous release (builds serial on the driver) for comparison.
(c) Validation: the same generations on a real local Ray with 8 actors that sleep what the simulation charges
(time scale `--time-scale`), through the real `ActorPool`; the measured wall time must match the simulation,
given the measured call round trip, within 10%.

Prints tables and writes `benchmarks/results/ray_scaling.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, write_results  # noqa: E402
from tyr.cluster import PIPELINE_DEPTH, ActorPool  # noqa: E402
from tyr.search.batch import Batch, stage_batch  # noqa: E402
from tyr.search.evolution import sample_offspring  # noqa: E402
from tyr.search.scheduling import WorkQueue, assign, nearest_chain, unit_blocks  # noqa: E402
from tyr.search.space import GeneLadder, Genome, SearchSpace, budget_for_start  # noqa: E402
from tyr.supernet.variant import genes_of  # noqa: E402

WORKER_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)

# ---- the paper schedule and an 8B-shaped search space -------------------------------------------------------
SEQ_LEN = 4096
NUM_SEQUENCES = 1024
NUM_OFFSPRING = 128
MAX_MUTATIONS = 4
STAGES = ((16, 2048), (4, 16384), (1, 131072))  # (survivors, tokens)
NUM_LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, CHANNELS = 32, 4096, 32, 8, 128, 14336  # Llama-3.1-8B
LEVELS = tuple(range(-4, 5))  # 9 levels of 12.5%, centred on 50%

# ---- per-unit costs (estimates; H100-SXM, bf16, Llama-3.1-8B at 50%, top-8192 targets) ------------------------
TFLOPS = 475e12  # effective bf16 GEMM rate, the middle of SCALE-style estimates of 400-550 TFLOP/s
GFLOP_PER_TOKEN = 8.8  # compact 50% 8B candidate incl. the 1.05 GFLOP full-vocab head and causal attention
ASSUMPTIONS = {
    "label": "estimates, not measurements (no GPU was used): Llama-3.1-8B pruned to 50% on H100-SXM-80GB",
    "schedule": "paper: 128 offspring, max_mutations 4, stages (16, 2048), (4, 16384), (1, 131072) tokens, "
    "seq_len 4096, 1024 calibration sequences, parent joins the last stage (legacy selection), "
    "4 iterations x 50 generations",
    "search_space": "64 genes (32 layers x attention, MLP), 9 levels of 12.5% around 50%, per_type budget; "
    "offspring from tyr.search.evolution.sample_offspring; survivors drawn at random",
    "sequence_s": f"{GFLOP_PER_TOKEN} GFLOP/token x 4096 tokens / {TFLOPS / 1e12:.0f} TFLOP/s effective bf16 "
    "= forward + sparse KL of one 4096-token sequence; a 2048-token prefix costs half",
    "forward_s": "0.002: fixed cost per forward (kernel launches, Python)",
    "rows_s": "0.050 per 4096-token sequence: its top-8192 teacher rows (4096 x 8192 x 6 B = 201 MB) read and "
    "copied to the GPU at ~4 GB/s effective, once per block per worker and call (not overlapped with compute)",
    "swap_s": "0.005 per gene whose level differs from the worker's model (re-fitted columns, pageable H2D)",
    "call_s": "0.001: worker-side fixed cost per call",
    "latency_s": "0.0005 each way (1 ms round trip: LAN; 0.6 ms measured locally, ray_throughput.json)",
    "driver_s": "0.0003 of driver time per call handed out (0.15-0.35 ms measured per no-op candidate)",
    "end_to_end": "teacher pass 10 min, supernet build 25 min each (4 builds, fp32 Hessians), final metrics "
    "5 min on one process; 200 generations at the simulated time per generation",
    "data_parallel_teacher": "each worker computes blocks of sequences and writes them into the targets file "
    "on the shared run directory: teacher / N plus a fixed 2 min (the driver's digest of the 192 GiB targets "
    "file, read from shared storage at ~2 GB/s: hashed by all its cores since this release, so the read bounds "
    "it, not one core's 1.43 GB/s (benchmarks/file_digest.json); the serial pass pays it too; and dispatch)",
    "data_parallel_build": "a serial 25-min build split as forwards (two passes over 4.2M tokens) 5 min, fp32 "
    "Hessians 17 min, fp64 pruning 2 min (30% the shared inverse, 70% the 9 levels' mask selection), variant "
    "writes + sha256 1 min. On N workers: (forwards + Hessians) / N; pruning 0.3 + 0.7 x ceil(9 / G) / 9 of "
    "its time with G = min(N, 9) level groups; writes / G (each group writes its levels); per gene the "
    "shards' Hessians (fp32: 822 MB per MLP gene, 67 MB per attention gene) are added by a pairwise tree, "
    "ceil(log2 N) rounds of one transfer at 10 GB/s and one sum at 5 GB/s, and the sum goes from one node to "
    "the G - 1 other pruning workers at 10 GB/s (no multi-source pulls assumed); every worker reads each gene's "
    "variants (20 GiB per build, 2 GB/s, in parallel)",
    "final_metrics": "5 min serially = 6 forwards over the held-out set (dense top-K targets, dense ppl, uniform "
    "ppl + KL, searched ppl + KL); on the workers its 3 parts run in parallel: dense ppl (1 forward) and the "
    "uniform and searched parts (3 forwards each: they compute the dense targets themselves), so 3/6 of the "
    "time on N >= 3 workers, 4/6 on 2",
    "scenarios": "resident (the headline: this release when the supernet fits in 40% of the GPU's free "
    "memory, as `tyr plan` finds for 8B on an 80 GB H100): variants kept on the GPU (search.variant_device_bytes) "
    "so a swap is a device copy, 0.2 ms per gene, and teacher rows read ahead by the evaluator's reader "
    "thread, 5 ms per sequence left on the critical path; host_variants (this release, a supernet too large "
    "for the device): swaps from host RAM (5 ms per gene), rows read ahead (5 ms); previous (the release "
    "before: swaps from host RAM, rows read on demand, 50 ms per sequence, not overlapped); work_only: "
    "forwards only, every overhead zero (the limit set by how the stages' units divide over N workers). "
    "The GPU paths of this release were not run (no GPU): their costs are estimates like the others",
}


@dataclass(frozen=True)
class Costs:
    """Seconds charged for one worker's work (see ASSUMPTIONS)."""

    sequence_s: float = GFLOP_PER_TOKEN * 1e9 * SEQ_LEN / TFLOPS
    forward_s: float = 0.002
    rows_s: float = 0.050
    swap_s: float = 0.005
    call_s: float = 0.001
    latency_s: float = 0.0005
    driver_s: float = 0.0003

    def work_scaled(self, factor: float) -> Costs:
        """The worker's costs times `factor` (latency and driver time are the machine's own)."""
        return dataclasses.replace(
            self,
            sequence_s=self.sequence_s * factor,
            forward_s=self.forward_s * factor,
            rows_s=self.rows_s * factor,
            swap_s=self.swap_s * factor,
            call_s=self.call_s * factor,
        )


def scenarios() -> dict[str, Costs]:
    """The per-unit costs of this release with the supernet on the GPU (the headline) or in host RAM, of the
    release before (rows not read ahead), and of the forwards alone (see ASSUMPTIONS)."""
    zero = {"forward_s": 0.0, "rows_s": 0.0, "swap_s": 0.0, "call_s": 0.0, "latency_s": 0.0, "driver_s": 0.0}
    return {
        "resident": Costs(swap_s=0.0002, rows_s=0.005),
        "host_variants": Costs(rows_s=0.005),
        "previous": Costs(),
        "work_only": Costs(**zero),  # the stage structure's own limit: forwards only, no overhead at all
    }


END_TO_END_MIN = {"teacher": 10.0, "build": 25.0, "num_builds": 4, "final": 5.0, "generations": 200}
TEACHER_FIXED_MIN = 2.0
BUILD_MIN = {
    "forwards": 5.0,
    "hessians": 17.0,
    "pruning": 2.0,
    "writes": 1.0,
}  # sums to END_TO_END_MIN["build"]
PRUNING_SHARED = 0.3  # of the pruning time: the inverse every level group computes
HESSIAN_BYTES = {"mlp": CHANNELS**2 * 4, "attn": (HEADS * HEAD_DIM) ** 2 * 4}  # fp32 H of one gene
NETWORK_BPS, SUM_BPS, VARIANT_READ_BPS = 10e9, 5e9, 2e9
VARIANT_BYTES = 20 * 2**30  # one 8B supernet


def build_minutes(n: int) -> float:
    """One 8B supernet build on n workers as tyr/cluster_build runs it (n = 1: the serial build)."""
    b = BUILD_MIN
    if n == 1:
        return sum(b.values())
    groups = min(n, len(LEVELS))
    pruning = b["pruning"] * (
        PRUNING_SHARED + (1 - PRUNING_SHARED) * math.ceil(len(LEVELS) / groups) / len(LEVELS)
    )
    rounds = math.ceil(math.log2(n))
    per_layer = sum(
        rounds * (h / NETWORK_BPS + h / SUM_BPS) + (groups - 1) * h / NETWORK_BPS
        for h in HESSIAN_BYTES.values()
    )
    reduce_min = NUM_LAYERS * per_layer / 60
    reads = VARIANT_BYTES / VARIANT_READ_BPS / 60
    return (b["forwards"] + b["hessians"]) / n + pruning + b["writes"] / groups + reduce_min + reads


def paper_space() -> SearchSpace:
    """An 8B-shaped search space: exact unit counts, parameter counts close enough for the budget's role here."""
    ladders = []
    for gene in genes_of(NUM_LAYERS):
        if gene.kind == "attn":
            units = tuple(HEADS // 2 - HEADS // 8 * lv for lv in LEVELS)  # 32, 28, ..., 16, ..., 0 heads
            fixed, per_unit = 2 * KV_HEADS * HEAD_DIM * HIDDEN, 2 * HEAD_DIM * HIDDEN
        else:
            units = tuple(CHANNELS // 2 - CHANNELS // 8 * lv for lv in LEVELS)
            fixed, per_unit = 0, 3 * HIDDEN
        ladders.append(GeneLadder(gene, LEVELS, units, tuple(fixed + per_unit * u for u in units)))
    centre = (0,) * len(ladders)
    return SearchSpace(ladders, budget_for_start(ladders, centre, "per_type"))


def paper_generations(num_generations: int, seed: int = 0) -> list[tuple[list[Genome], Batch]]:
    """The fitness calls (candidates, batch) of `num_generations` consecutive generations."""
    space, rng = paper_space(), np.random.default_rng(seed)
    parent: Genome = (0,) * space.num_genes
    calls = []
    for _ in range(num_generations):
        candidates = sample_offspring(parent, space, rng, NUM_OFFSPRING, MAX_MUTATIONS)
        for s, (survivors, tokens) in enumerate(STAGES):
            if s == len(STAGES) - 1:
                candidates = [*candidates, parent]
            calls.append((candidates, stage_batch(rng, tokens, NUM_SEQUENCES, SEQ_LEN)))
            keep = np.sort(rng.choice(len(candidates), size=survivors, replace=False))
            candidates = [candidates[i] for i in keep]
        parent = candidates[0]
    return calls


# ---- what one worker spends ----------------------------------------------------------------------------------
@dataclass
class WorkerModel:
    """What a worker holds between units: the genome on its model and the blocks of teacher rows of its batch."""

    genome: Genome | None = None
    rows_key: tuple | None = None
    held: set = field(default_factory=set)

    def run(self, units, batch: Batch, costs: Costs, batch_size: int) -> float:
        """Seconds for `units` ([genome, start, stop] as a worker receives them), updating what it holds."""
        positions = batch.positions(SEQ_LEN)
        share = positions / SEQ_LEN  # a prefix costs its share of a whole sequence (compute and rows)
        key = (batch.sequences, positions)
        if key != self.rows_key:
            self.rows_key, self.held = key, set()
        seconds = 0.0
        for genome, start, stop in units:
            genome = tuple(genome)
            swaps = len(genome) if self.genome is None else sum(a != b for a, b in zip(self.genome, genome))
            self.genome = genome
            n = stop - start
            if (start, stop) not in self.held:
                self.held.add((start, stop))
                seconds += n * share * costs.rows_s
            forwards = math.ceil(n / batch_size)
            seconds += swaps * costs.swap_s + forwards * costs.forward_s + n * share * costs.sequence_s
        return seconds


def _fake_sums(units) -> list[list[float]]:
    return [[0.001 * (1 + start + i) for i in range(stop - start)] for _, start, stop in units]


# ---- (a) the simulation ------------------------------------------------------------------------------------------
@dataclass
class SimWorker:
    """A simulated worker as `assign` sees it (index, tail, in_flight), plus when it is next free."""

    index: int
    tail: Genome | None = None
    in_flight: int = 0
    busy_until: float = 0.0
    model: WorkerModel = field(default_factory=WorkerModel)


def blocks_for(policy: str, batch: Batch, batch_size: int) -> list[tuple[int, int]]:
    n = len(batch.sequences)
    return [(0, n)] if policy == "whole" else unit_blocks(n, batch_size)


def simulate_call(workers, genomes, batch, policy: str, costs: Costs, batch_size: int) -> float:
    """Wall seconds of one fitness call on `workers` (their models carried over), as `ActorPool.evaluate` runs it:
    hand out calls (`assign`), wait for the earliest answer, record it, hand out again."""
    queue = WorkQueue(genomes, blocks_for(policy, batch, batch_size), max_attempts=1)
    now, answers, order = 0.0, [], itertools.count()
    for w in workers:
        w.busy_until = 0.0
    while queue.pending or answers:
        for w, units in assign(queue, workers, PIPELINE_DEPTH):
            now += costs.driver_s
            payload = [[queue.unique[c], *queue.blocks[b]] for c, b in units]
            start = max(now + costs.latency_s, w.busy_until)
            w.busy_until = start + costs.call_s + w.model.run(payload, batch, costs, batch_size)
            heapq.heappush(answers, (w.busy_until + costs.latency_s, next(order), w, units, payload))
        answered_at, _, w, units, payload = heapq.heappop(answers)
        now = max(now, answered_at)
        w.in_flight -= 1
        queue.complete(units, _fake_sums(payload))
    return now


def serial_call(model: WorkerModel, genomes, batch, costs: Costs, batch_size: int) -> float:
    """Seconds of `SerialEvaluator.__call__`: nearest-genome chain, all blocks of a candidate in turn."""
    unique = list(dict.fromkeys(tuple(g) for g in genomes))
    order = nearest_chain(model.genome, unique, list(range(len(unique))), len(unique))
    blocks = unit_blocks(len(batch.sequences), batch_size)
    return model.run([[unique[c], a, b] for c in order for a, b in blocks], batch, costs, batch_size)


def first_parent(calls) -> Genome:
    """The first generation's parent: the last candidate of its last stage."""
    return tuple(calls[len(STAGES) - 1][0][-1])


def simulate(calls, num_workers: int, policy: str, costs: Costs, batch_size: int) -> list[float]:
    """Seconds of each call, the workers' state carried from call to call (all start holding the first parent)."""
    parent = first_parent(calls)
    workers = [SimWorker(i, tail=parent, model=WorkerModel(parent)) for i in range(num_workers)]
    return [simulate_call(workers, g, b, policy, costs, batch_size) for g, b in calls]


def serial_seconds(calls, costs: Costs, batch_size: int) -> list[float]:
    model = WorkerModel(first_parent(calls))
    return [serial_call(model, g, b, costs, batch_size) for g, b in calls]


def scaling_table(calls, costs: Costs, batch_sizes, worker_counts) -> dict:
    """Per (policy, batch_size): the serial seconds per generation and, per N, the parallel seconds and efficiency."""
    num_generations = len(calls) // len(STAGES)
    out = {}
    for bs in batch_sizes:
        serial = sum(serial_seconds(calls, costs, bs))
        for policy in ("whole", "units"):
            per_n = {}
            for n in worker_counts:
                parallel = sum(simulate(calls, n, policy, costs, bs))
                per_n[n] = {
                    "seconds_per_generation": parallel / num_generations,
                    "efficiency": serial / (n * parallel),
                }
            out[f"{policy}, batch_size {bs}"] = {
                "policy": policy,
                "batch_size": bs,
                "serial_seconds_per_generation": serial / num_generations,
                "workers": per_n,
            }
    return out


# ---- (b) end to end ------------------------------------------------------------------------------------------------
def end_to_end(serial_generation_s: float, generation_s: dict[int, float]) -> dict:
    """Minutes and speed-ups of a whole 8B run: this release (teacher pass and builds data-parallel on the
    workers) and the previous one (builds serial on the driver)."""
    e = END_TO_END_MIN
    assert abs(sum(BUILD_MIN.values()) - e["build"]) < 1e-9

    def minutes(n: int, parallel_builds: bool) -> float:
        search = e["generations"] * (generation_s[n] if n > 1 else serial_generation_s) / 60
        if n == 1:
            return e["teacher"] + e["num_builds"] * e["build"] + search + e["final"]
        teacher = e["teacher"] / n + TEACHER_FIXED_MIN
        builds = e["num_builds"] * (build_minutes(n) if parallel_builds else e["build"])
        final = e["final"] * ((3 if n >= 3 else 4) / 6 if parallel_builds else 1)  # its parts on the workers
        return teacher + builds + search + final

    one = minutes(1, False)
    rows = {}
    for n in generation_s:
        today, before = minutes(n, True), minutes(n, False)
        rows[n] = {
            "minutes": today,
            "speedup": one / today,
            "build_minutes": build_minutes(n),
            "minutes_serial_builds": before,
            "speedup_serial_builds": one / before,
        }
    return {"serial_minutes": one, "workers": rows}


# ---- (c) validation on a real local Ray -----------------------------------------------------------------------------
class SleepWorker:
    """A Ray worker with `_Worker`'s interface that sleeps what the simulation charges instead of computing."""

    def __init__(self, spec: dict):
        self.costs = Costs(**spec["costs"])
        self.batch_size = int(spec["batch_size"])  # sequences per forward (a unit may span several)
        self.model = WorkerModel(tuple(spec["start"]))

    def setup(self, supernet_dir: str, fingerprint_hash: str) -> dict:
        return {"pid": os.getpid(), "host": "local", "device": "sleep", "threads": 0, "seconds_setup": 0.0}

    def evaluate(self, supernet_dir: str, fingerprint_hash: str, units: list, batch: dict) -> dict:
        t0 = time.perf_counter()
        batch = Batch.from_json(batch)
        seconds = self.costs.call_s + self.model.run(units, batch, self.costs, self.batch_size)
        time.sleep(max(0.0, seconds - (time.perf_counter() - t0)))
        return {"sums": _fake_sums(units), "io": {}}

    def ping(self) -> None:
        return None


def validate(calls, batch_size: int, time_scale: float, num_workers: int = 8) -> dict:
    """Run `calls` on a local Ray through `ActorPool` with sleeping workers, with both policies, and compare the
    measured wall time with the simulation's (given the measured round trip of an empty call)."""
    costs = Costs().work_scaled(time_scale)
    runs = {
        policy: _validate_policy(calls, policy, costs, batch_size, num_workers)
        for policy in ("units", "whole")
    }
    return {
        "workers": num_workers,
        "batch_size": batch_size,
        "time_scale": time_scale,
        "num_calls": len(calls),
        "runs": runs,
        "within_10_percent": all(r["within_10_percent"] for r in runs.values()),
        "load_average": os.getloadavg()[0],
    }


def _validate_policy(calls, policy: str, costs: Costs, batch_size: int, num_workers: int) -> dict:
    import ray

    start = first_parent(calls)  # every worker's model holds it, as in `simulate`
    spec = {"costs": dataclasses.asdict(costs), "batch_size": batch_size, "start": list(start)}
    unit = batch_size if policy == "units" else NUM_SEQUENCES  # whole: one block = the whole batch
    pool = ActorPool(
        SleepWorker, spec, num_workers, batch_size=unit, seq_len=SEQ_LEN, num_cpus_per_worker=0.25
    )
    try:
        pool.prepare(REPO, "simulated")
        for slot in pool.slots:
            slot.tail = start
        actor = pool.slots[0].actor
        ray.get(actor.ping.remote())
        rtts = []
        for _ in range(50):
            t0 = time.perf_counter()
            ray.get(actor.ping.remote())
            rtts.append(time.perf_counter() - t0)
        rtt = statistics.median(rtts)
        measured = []
        for genomes, batch in calls:
            t0 = time.perf_counter()
            pool.evaluate(REPO, "simulated", genomes, batch)
            measured.append(time.perf_counter() - t0)
    finally:
        pool.close()
    simulated = simulate(
        calls, num_workers, policy, dataclasses.replace(costs, latency_s=rtt / 2), batch_size
    )
    ratio = sum(measured) / sum(simulated)
    return {
        "round_trip_s": rtt,
        "measured_s": sum(measured),
        "simulated_s": sum(simulated),
        "ratio": ratio,
        "within_10_percent": abs(ratio - 1) <= 0.10,
        "per_call_measured_s": measured,
        "per_call_simulated_s": simulated,
    }


# ---- report -----------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--generations", type=int, default=4, help="generations simulated (default 4)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per unit of the headline (1)")
    parser.add_argument("--no-validate", action="store_true", help="skip the local Ray validation")
    parser.add_argument("--validate-generations", type=int, default=3)
    parser.add_argument("--time-scale", type=float, default=0.5, help="validation sleeps x this (0.5)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    calls = paper_generations(args.generations)
    batch_sizes = sorted({args.batch_size, 4})
    tables = {name: scaling_table(calls, c, batch_sizes, WORKER_COUNTS) for name, c in scenarios().items()}
    headline = f"units, batch_size {args.batch_size}"
    e2e = {name: end_to_end_of(tables[name][headline]) for name in ("resident", "host_variants", "previous")}
    validation = None
    if not args.no_validate:
        v_calls = paper_generations(args.validate_generations, seed=1)
        validation = validate(v_calls, args.batch_size, args.time_scale)

    print_report(tables, e2e, validation)
    head, head_e2e = tables["resident"][headline]["workers"], e2e["resident"]["workers"]
    payload = {
        "workers": list(WORKER_COUNTS),
        "search_efficiency": [head[n]["efficiency"] for n in WORKER_COUNTS],
        "end_to_end_speedup": [head_e2e[n]["speedup"] for n in WORKER_COUNTS],
        "end_to_end_speedup_serial_builds": [head_e2e[n]["speedup_serial_builds"] for n in WORKER_COUNTS],
        "headline": f"simulation, resident costs (this release, the supernet on the GPU; see "
        f"assumptions.scenarios), {headline} sequence(s) per unit; end_to_end_speedup: teacher pass and supernet "
        "builds data-parallel on the workers (this release, modelled as assumptions.data_parallel_build says); "
        "end_to_end_speedup_serial_builds: the builds on the driver (the previous release's structure)",
        "search_efficiency_by_policy": {
            f"{scenario}: {name}": [t["workers"][n]["efficiency"] for n in WORKER_COUNTS]
            for scenario, table in tables.items()
            for name, t in table.items()
        },
        "seconds_per_generation": {
            f"{scenario}: {name}": {"serial": t["serial_seconds_per_generation"]}
            | {str(n): t["workers"][n]["seconds_per_generation"] for n in WORKER_COUNTS}
            for scenario, table in tables.items()
            for name, t in table.items()
        },
        "end_to_end_minutes": e2e,
        "validation": validation,
        "assumptions": {
            **ASSUMPTIONS,
            "costs_s": {name: dataclasses.asdict(c) for name, c in scenarios().items()},
            "generations_simulated": args.generations,
        },
    }
    print(f"\nwritten {write_results('ray_scaling', payload)}")


def end_to_end_of(table: dict) -> dict:
    generation_s = {n: v["seconds_per_generation"] for n, v in table["workers"].items()}
    return end_to_end(table["serial_seconds_per_generation"], generation_s)


def print_report(tables: dict, e2e: dict, validation: dict | None) -> None:
    for scenario, table in tables.items():
        c = scenarios()[scenario]
        print(
            f"\nSimulated search efficiency = serial time / (N x parallel time), paper schedule, 8B estimates, "
            f"{scenario} costs (a sequence {c.sequence_s * 1e3:.0f} ms, its rows {c.rows_s * 1e3:.0f} ms, a swap "
            f"{c.swap_s * 1e3:.1f} ms/gene); seconds per generation in brackets\n"
        )
        names = list(table)
        rows = [["serial", *(f"({t['serial_seconds_per_generation']:.1f} s)" for t in table.values())]]
        rows += [
            [n, *(f"{t['workers'][n]['efficiency']:.3f} ({t['workers'][n]['seconds_per_generation']:.2f} s)"
                  for t in table.values())]
            for n in WORKER_COUNTS
        ]  # fmt: skip
        print(markdown_table(["N", *names], rows))
    for scenario, run in e2e.items():
        print(
            f"\nEnd-to-end 8B run, {scenario} search costs (serial {run['serial_minutes']:.0f} min): teacher pass "
            "and builds data-parallel on the workers (this release); the builds serial on the driver (before)\n"
        )
        rows = [
            [
                n,
                r["build_minutes"],
                r["minutes"],
                r["speedup"],
                r["minutes_serial_builds"],
                r["speedup_serial_builds"],
            ]
            for n, r in run["workers"].items()
        ]
        header = ["N", "min / build", "min", "speed-up", "min (serial builds)", "speed-up (serial builds)"]
        print(markdown_table(header, rows))
    if validation:
        v = validation
        print(
            f"\nValidation on a local Ray: {v['workers']} sleeping workers, {v['num_calls']} calls, work costs x "
            f"{v['time_scale']}, load average {v['load_average']:.1f}\n"
        )
        rows = [
            [policy, r["round_trip_s"] * 1e3, r["measured_s"], r["simulated_s"], r["ratio"]]
            for policy, r in v["runs"].items()
        ]
        print(markdown_table(["policy", "round trip (ms)", "measured (s)", "simulated (s)", "ratio"], rows))
        print(f"within 10%: {v['within_10_percent']}")


if __name__ == "__main__":
    main()
