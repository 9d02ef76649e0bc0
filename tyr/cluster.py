"""The Ray side of a run: connecting to a cluster, the long-lived worker actors and what each one loads.

Fitness evaluation follows the protocol of `tyr.search.evaluator.SerialEvaluator`
(`__call__(genomes, batch) -> list[float]`); `RayEvaluator` spreads it over actors, one per worker slot. Each
actor loads the model and the calibration tokens itself from the run's config (`tyr.pipeline.open_session`),
opens the teacher targets and the iteration's supernet from the run directory (which must be on storage every
node reads at the same path) and holds a `SerialEvaluator`, so it swaps only the genes that change between two
candidates, keeps the supernet resident when it fits and reads each block's teacher rows once. Its store checks
file sizes only: the driver verified every file's sha256. Per call only small integer genomes, the batch
(sequence indices, positions) and block boundaries travel; tokens, targets and variants never do.

The work is units (`tyr.search.scheduling`): one candidate on one block of `search.batch_size` consecutive
sequences of the call's batch. A worker returns one float64 KL sum per sequence of each unit, and its I/O
counters; the driver adds each candidate's sums in sequence order (`kl_mean`, as the serial evaluator does)
and sums the counters (`RayEvaluator.io_counters`). What each worker does next is decided by
`tyr.search.scheduling.assign` (home blocks, nearest-genome work pulling, duplicates once); this module owns the
actors' lifecycle: start, set-up, replacement of a dead actor (its unfinished units go back to the queue),
shutdown.

See docs/ray.md for cluster usage.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tyr.config import RunConfig, to_dict
from tyr.errors import TyrError
from tyr.rundir import RunDir
from tyr.search.batch import Batch, as_batch
from tyr.search.counters import IOCounters
from tyr.search.scheduling import WorkQueue, assign, unit_blocks
from tyr.search.space import Genome

__all__ = [
    "FORWARDED_ENV_PREFIXES",
    "ActorPool",
    "RayEvaluator",
    "RayEvaluatorFactory",
    "RayStats",
    "RayWorkerPool",
    "connect",
    "forwarded_environment",
    "ray_evaluator_factory",
    "resolve_gpus_per_worker",
    "workers_that_fit",
]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # TCP check of a cluster address before Ray is asked to join it
PIPELINE_DEPTH = 2  # calls in flight per worker, so a worker never waits for the driver between chunks
_WAIT_POLL_S = 1.0  # ray.wait timeout in the scheduling loop (keeps Ctrl-C responsive)
# The driver's environment variables that reach the actors (`runtime_env`): hub tokens and cache paths (HF_HOME,
# HF_TOKEN, HF_HUB_OFFLINE, ...) and Tyr's own. Nothing else: a cluster's nodes keep their own PATH, CUDA, etc.
FORWARDED_ENV_PREFIXES = ("HF_", "TYR_")


def _ray():
    try:
        import ray
    except ImportError:
        raise TyrError(
            "the Ray backend needs the package ray: pip install 'tyr-pruner[ray]' (or `make setup`)"
        ) from None
    return ray


# -- connecting -----------------------------------------------------------------------------------------------


def _check_reachable(address: str, timeout_s: float) -> None:
    """TyrError unless a TCP connection to host:port of `address` opens within `timeout_s`."""
    from tyr.config import ray_host_port  # the syntax check, shared with config validation

    host, port = ray_host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise TyrError(
            f"cannot reach the Ray cluster at {address} ({e}); check the address, that the head node is "
            "running (`ray start --head`) and that its port is open from here"
        ) from None


def connect(
    address: str | None,
    num_cpus: int | None = None,
    verbose: bool = False,
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> bool:
    """Make this process a Ray driver; returns True when it started a new local instance (the caller shuts it down).

    `address`: None starts a local instance (or joins $RAY_ADDRESS when that is set); 'auto' joins the cluster
    running on this machine; 'host:port' (the head's GCS port, 6379 by default) or 'ray://host:port' (Ray
    Client, port 10001) join a remote one. An unreachable address gives TyrError within `timeout_s` (+ Ray's
    own handshake), never a hang. An already connected process is reused as it is. Ray's logs stay quiet
    unless `verbose`.
    """
    ray = _ray()
    if ray.is_initialized():
        return False
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    quiet: dict[str, Any] = {
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    env = forwarded_environment()
    if env:  # actors on other nodes do not inherit the driver's environment
        quiet["runtime_env"] = {"env_vars": env}
    if address is None:
        kwargs: dict[str, Any] = {"address": "local", "include_dashboard": False, **quiet}
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    elif address == "auto":
        kwargs = {"address": "auto", **quiet}
    elif address.startswith("ray://"):
        _check_reachable(address, timeout_s)
        kwargs = {"address": address, **({"runtime_env": quiet["runtime_env"]} if env else {})}
    else:
        _check_reachable(address, timeout_s)
        kwargs = {"address": address, **quiet}
    try:
        ray.init(**kwargs)
    except Exception as e:  # ConnectionError, TimeoutError, RuntimeError, grpc errors, ...
        where = "start a local Ray instance" if address is None else f"join the Ray cluster at {address}"
        raise TyrError(f"cannot {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return address is None


def forwarded_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of `environ` (default: this process's) that the actors get: names starting with one of
    `FORWARDED_ENV_PREFIXES`."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


# -- what the workers ask of the cluster --------------------------------------------------------------------------


def resolve_gpus_per_worker(
    requested: float | str, cluster_gpus: float, allow_cpu_workers: bool = False
) -> float:
    """GPUs per worker for `backend.num_gpus_per_worker` on a cluster with `cluster_gpus` GPUs in all.

    auto: 1 when the cluster has GPUs, else 0. An explicit 0 on a cluster with GPUs is refused unless
    `allow_cpu_workers`: CPU fitness next to idle GPUs is almost always a forgotten setting.
    """
    if requested == "auto":
        return 1.0 if cluster_gpus > 0 else 0.0
    gpus = float(requested)
    if gpus == 0 and cluster_gpus > 0 and not allow_cpu_workers:
        raise TyrError(
            f"backend.num_gpus_per_worker is 0 but the Ray cluster has {cluster_gpus:g} GPU(s): the workers would "
            "evaluate on CPUs. Use backend.num_gpus_per_worker=auto (one GPU per worker) or a GPU count, or set "
            "backend.allow_cpu_workers=true to use CPU workers anyway"
        )
    return gpus


def workers_that_fit(nodes: Sequence[dict], num_cpus: float, num_gpus: float) -> int:
    """How many workers of (`num_cpus`, `num_gpus`) the alive `nodes` (`ray.nodes()` entries) hold at once.

    A worker's resources come from one node, so a 4-GPU worker fits on no 2-GPU node however many there are.
    Requests of 0 CPU and 0 GPU fit anywhere (a large number is returned).
    """
    total = 0
    for node in nodes:
        if not node.get("Alive", True):
            continue
        have = node.get("Resources", {})
        counts = [
            math.floor(have.get(name, 0.0) / need + 1e-9)
            for name, need in (("CPU", num_cpus), ("GPU", num_gpus))
            if need > 0
        ]
        total += min(counts) if counts else 1 << 30
    return total


def _largest_node(nodes: Sequence[dict]) -> str:
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    if not alive:
        return "no node is alive"
    best = max(alive, key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)))
    return f"the largest node has {best.get('CPU', 0.0):g} CPU, {best.get('GPU', 0.0):g} GPU"


# -- the worker (runs inside a Ray actor) -----------------------------------------------------------------------


def _worker_device(cfg_device: str, num_gpus: float) -> str:
    """The device an actor uses: CPU unless Ray gave it GPUs (then its first visible GPU)."""
    if num_gpus <= 0:
        return "cpu"
    if cfg_device == "cpu":
        raise TyrError("num_gpus_per_worker > 0 but model.device is 'cpu'; use model.device=auto or cuda")
    return "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned: cuda:N would point elsewhere


class _Worker:
    """One worker slot's state inside its actor: a session, the teacher targets and a SerialEvaluator.

    Set-up is lazy (on `setup` or the first `evaluate`), so a restarted actor rebuilds itself on its next call.
    """

    def __init__(self, spec: dict):
        self.spec = spec
        self.session = None
        self.targets = None
        self.tokens = None  # the evaluator's windows: calibration, then validation when the run has them
        self.hidden = None
        self.evaluator = None
        self.supernet: tuple[str, str] | None = None
        self.shards = None  # tyr.cluster_build.ShardHost: this worker's shards of a supernet build
        self.seconds_setup = 0.0
        self.device_name: str | None = None

    # ---- set-up --------------------------------------------------------------------------------------------
    def _open_session(self) -> None:
        import torch

        from tyr import pipeline
        from tyr.config import RunConfig, from_dict
        from tyr.data import load_tokens

        t0 = time.perf_counter()
        spec = self.spec
        torch.set_num_threads(int(spec["num_threads"]))
        cfg = from_dict(RunConfig, spec["config"])
        num_gpus = float(spec["num_gpus"])
        cfg.model.device = _worker_device(cfg.model.device, num_gpus)
        multi_gpu = num_gpus > 1 and torch.cuda.device_count() > 1
        if multi_gpu:  # load on the CPU, then spread the blocks over this actor's GPUs
            cfg.model.device = "cpu"
            cfg.model.placement = "single"  # the spreading below is this worker's placement
            if cfg.model.dtype == "auto":
                cfg.model.dtype = "bfloat16"  # what `auto` gives on one GPU
        # the run's kept windows (RUN/data/, on the shared storage): no actor re-reads or re-tokenises the source
        saved = load_tokens(
            RunDir(spec["run_dir"]).tokens_path("calibration"), (cfg.data.num_sequences, cfg.data.seq_len)
        )
        session = pipeline.open_session(cfg, progress=False, calibration=saved)
        self.device_name = str(session.device)
        if multi_gpu:
            session.model = _dispatch_over_gpus(session.model)
            self.device_name = f"{torch.cuda.device_count()} GPUs"
        self.session = session
        self.seconds_setup = time.perf_counter() - t0

    def _open_targets(self) -> None:
        """The run's teacher targets (and hidden states for kl+hidden), written by the run's teacher phase; with
        validation windows, their targets stacked after the calibration ones (rows N.., as the serial backend
        stacks them), so validation KL is scored here too."""
        import torch

        from tyr.evaluators.teacher import StackedTargets, TeacherTargets

        cfg, run = self.session.cfg, RunDir(self.spec["run_dir"])
        targets = TeacherTargets.open(run.teacher_dir)
        if targets.k != cfg.search.topk:
            raise TyrError(
                f"teacher targets in {targets.directory} have k={targets.k} but search.topk={cfg.search.topk}"
            )
        targets.check_tokens(self.session.calibration)
        self.tokens = self.session.calibration
        if cfg.data.num_validation_sequences and (run.validation_teacher_dir / "meta.json").is_file():
            validation = TeacherTargets.open(run.validation_teacher_dir)
            tokens = self._kept_tokens("validation")
            validation.check_tokens(tokens)
            self.tokens = torch.cat([self.session.calibration, tokens])  # (N + V, seq_len)
            targets = StackedTargets(targets, validation)
        self.targets = targets
        if cfg.search.fitness == "kl+hidden":
            from tyr.evaluators.hidden import TeacherHidden

            self.hidden = TeacherHidden.open(run.teacher_hidden_dir)

    def _use_supernet(self, supernet_dir: str, fingerprint_hash: str) -> None:
        if self.supernet == (supernet_dir, fingerprint_hash):
            return
        if self.targets is None:
            self._open_targets()
        from tyr.run import search_evaluator

        if self.evaluator is not None:
            self.evaluator.close()  # back to dense before another supernet's variants are applied
            self.evaluator, self.supernet = None, None
        store = self._open_store(supernet_dir, fingerprint_hash)
        self.evaluator = search_evaluator(
            self.session,
            store,
            self.targets,
            self.tokens,
            self.hidden,
            # an auto cache assumes every worker of the pool shares this machine's memory
            host_memory_share=0.5 / max(int(self.spec.get("num_workers", 1)), 1),
        )
        self.supernet = (supernet_dir, fingerprint_hash)

    def _open_store(self, supernet_dir: str, fingerprint_hash: str):
        from tyr.supernet.store import SupernetStore

        store = SupernetStore.open(supernet_dir, hash_files=False)  # the driver verified the files
        if store.fingerprint_hash != fingerprint_hash:
            raise TyrError(
                f"the supernet at {supernet_dir} seen from host {socket.gethostname()} is not the driver's "
                "(fingerprint differs): the run directory must be on storage shared by every node"
            )
        return store

    def setup(self, supernet_dir: str | None, fingerprint_hash: str | None) -> dict:
        """Load the model and the run's kept calibration windows; open `supernet_dir` too unless None (the
        teacher phase, before any supernet)."""
        if self.session is None:
            self._open_session()
        if supernet_dir is not None:
            self._use_supernet(supernet_dir, fingerprint_hash)
        return self.info()

    def teacher_rows(self, layout: dict, start: int, stop: int, what: str = "calibration") -> int:
        """Teacher targets of the run's kept `what` windows (calibration or validation) [start, stop) (one
        forward), written into the driver's targets file (`layout`, on the shared run directory). Returns the
        number of sequences written."""
        from tyr.evaluators.teacher import write_teacher_rows

        self._dense_model()
        session = self.session
        tokens = session.calibration if what == "calibration" else self._kept_tokens(what)
        write_teacher_rows(session.model, tokens, session.cfg.search.topk, layout, start, stop)
        return stop - start

    def final_metrics(self, part: str, first: list, last: list, genome: list, eval_tokens: Any) -> dict:
        """One part of the run's final metrics (`tyr.run.measure_part`: dense, uniform from `first`, `genome`
        from `last`; each (supernet_dir, fingerprint_hash)) on the held-out `eval_tokens`, on this worker."""
        import dataclasses

        import torch

        from tyr.run import measure_part

        self._dense_model()
        stores = [self._open_store(*supernet) for supernet in (first, last)]
        session = dataclasses.replace(self.session, eval_tokens=torch.as_tensor(eval_tokens))
        return measure_part(session, part, *stores, tuple(int(v) for v in genome))

    def _kept_tokens(self, what: str):
        """The run's kept `what` windows (RUN/data/), which the driver wrote before asking for them."""
        from tyr.data import load_tokens

        cfg = self.session.cfg
        rows = cfg.data.num_sequences if what == "calibration" else cfg.data.num_validation_sequences
        tokens = load_tokens(RunDir(self.spec["run_dir"]).tokens_path(what), (rows, cfg.data.seq_len))
        if tokens is None:
            raise TyrError(
                f"the run's {what} windows are not in {self.spec['run_dir']}/data (shared storage?)"
            )
        return tokens

    def _dense_model(self) -> None:
        """The model loaded and dense (a search's candidate is undone first): the teacher, a build and the
        final metrics start from the dense weights."""
        self.setup(None, None)
        self._maybe_fault()  # test hooks: the task's worker dies or hangs here
        self._maybe_hang()
        if self.evaluator is not None:
            self.evaluator.close()
            self.evaluator, self.supernet = None, None

    def build_step(self, call: dict) -> dict | None:
        """One step of a data-parallel supernet build on one shard of the calibration sequences
        (`tyr.cluster_build`)."""
        self._build_host()
        return self.shards.step(call)

    def build_capture(self, call: dict) -> tuple[int, dict]:
        """A shard's partial statistics of one gene (two values: `ActorPool.map(keep=True)`)."""
        self._build_host()
        return self.shards.capture(call)

    def build_combine(self, first: dict, second: dict) -> tuple[int, dict]:
        """The sum of two partial statistics (two values: `ActorPool.map(keep=True)`)."""
        from tyr.cluster_build import ShardHost

        self._maybe_fault()
        self._maybe_hang()
        return ShardHost.combine(first, second)

    def build_prune(self, call: dict, stats: dict) -> list[dict]:
        """Some levels of one gene pruned from the build's summed statistics and written (`tyr.cluster_build`)."""
        self._build_host()
        return self.shards.prune(call, stats)

    def _build_host(self) -> None:
        """Ready for a build step: the model loaded and dense, this worker's shard host made."""
        from tyr.cluster_build import ShardHost

        self._dense_model()
        if self.shards is None:
            self.shards = ShardHost.for_session(self.session)

    def info(self) -> dict:
        import torch

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": self.device_name,
            "threads": torch.get_num_threads(),
            "seconds_setup": self.seconds_setup,
        }

    # ---- work ----------------------------------------------------------------------------------------------
    def evaluate(self, supernet_dir: str, fingerprint_hash: str, units: list[list], batch: dict) -> dict:
        """Work units, in the order the scheduler chose: `units` = [[genome, start, stop], ...] (a block of
        `batch`'s sequences). Returns {"sums": per unit, the float64 KL sum of each sequence of its block,
        "io": this call's I/O counters}."""
        self.setup(supernet_dir, fingerprint_hash)
        fitness_batch = Batch.from_json(batch)
        before = self.evaluator.io_counters
        work = [(tuple(int(v) for v in genome), (int(start), int(stop))) for genome, start, stop in units]
        sums: list = [None] * len(work)
        # with a prefix cache, the chunk's reference genome first, the others replaying its blocks
        order = self.evaluator.order_units(work, fitness_batch)
        self.evaluator.prefetch_rows(fitness_batch, list(dict.fromkeys(work[i][1] for i in order)))
        for n, i in enumerate(order):
            genome, block = work[i]
            if n == min(1, len(work) - 1):
                self.evaluator.apply(genome)
                self._maybe_fault()  # mid-unit: its genome applied, nothing scored
                self._maybe_hang()
            sums[i] = self.evaluator.unit_sums(genome, fitness_batch, block)
        return {"sums": sums, "io": (self.evaluator.io_counters - before).to_json()}

    def _maybe_fault(self) -> None:
        """Test hook: SIGKILL this actor's own process mid-call when the fault file exists (removed first)."""
        path = self.spec.get("fault_file")
        if path and os.path.exists(path):
            try:
                os.remove(path)
            except FileNotFoundError:
                return  # another worker took this fault
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    def _maybe_hang(self) -> None:
        """Test hook: sleep forever mid-call when the hang file exists (removed first): a hung GPU or NFS read."""
        path = self.spec.get("hang_file")
        if path and os.path.exists(path):
            try:
                os.remove(path)
            except FileNotFoundError:
                return
            while True:
                time.sleep(3600)

    def noop(self, supernet_dir: str, fingerprint_hash: str, units: list[list], batch: dict) -> dict:
        """Scheduling + transfer only (benchmarks): what a call costs without an evaluation."""
        return {"sums": [[0.0] * (stop - start) for _, start, stop in units], "io": IOCounters().to_json()}


def _dispatch_over_gpus(model):
    """Spread a model's decoder blocks evenly over this actor's GPUs (`model.placement: balanced`'s map, not
    accelerate's default, which fills GPU 0 first and leaves it no room for compact copies); the same code as
    a balanced driver, tested with mock devices on the CPU, never run on GPUs."""
    from tyr.models import dispatch_balanced, gpu_devices

    return dispatch_balanced(model, gpu_devices()).eval()


_ACTOR_CLASSES: dict[type, Any] = {}


def _actor_class(worker_class: type) -> Any:
    if worker_class not in _ACTOR_CLASSES:
        _ACTOR_CLASSES[worker_class] = _ray().remote(worker_class)
    return _ACTOR_CLASSES[worker_class]


# -- the driver side ----------------------------------------------------------------------------------------------


@dataclass
class RayStats:
    calls: int = 0
    evaluations: int = 0  # unique candidates evaluated (duplicates within a call count once)
    units: int = 0  # work units evaluated (candidate x block of sequences), re-runs after a death included
    chunks: int = 0  # actor calls made
    failures: int = 0  # actor deaths seen
    restarts: int = 0  # replacement actors started
    seconds: float = 0.0  # wall time inside __call__
    workers: list[dict] = field(default_factory=list)  # info() of each slot's current actor


@dataclass
class _Slot:
    index: int
    actor: Any = None
    generation: int = 0  # bumped whenever the actor is replaced
    ready_ref: Any = None  # pending setup call; None once ready
    tail: Genome | None = None  # the genome applied once its in-flight calls finish (None = unknown)
    in_flight: int = 0
    consecutive_failures: int = 0
    retired: bool = False
    info: dict | None = None
    busy_since: float | None = None  # monotonic time its oldest call in flight began (None: idle)
    setup_since: float | None = None  # monotonic time its pending set-up call was made


def _shippable_config(cfg: RunConfig) -> dict:
    """`to_dict(cfg)` with local model/data paths made absolute (actors may run in another working directory)."""
    from tyr.data import BUILTIN_CORPORA
    from tyr.models import SMOLLM2_ALIAS

    d = to_dict(cfg)
    name = d["model"]["name"]
    if name != SMOLLM2_ALIAS and Path(name).expanduser().exists():
        d["model"]["name"] = str(Path(name).expanduser().resolve())
    for key in ("calibration", "eval"):
        src = d["data"][key]
        if src not in BUILTIN_CORPORA and Path(src).expanduser().exists():
            d["data"][key] = str(Path(src).expanduser().resolve())
    return d


class ActorPool:
    """`num_workers` long-lived Ray actors of `worker_class` that evaluate fitness as work units, and their
    lifecycle (start, set-up, replacement, shutdown); nothing here knows what a worker computes.

    A worker class has `setup(supernet_dir, fingerprint_hash) -> info dict` (pid, host, device, threads,
    seconds_setup) and `evaluate(supernet_dir, fingerprint_hash, units, batch) -> {"sums", "io"}` (see `_Worker`).
    `RayWorkerPool` is the pool of real workers; benchmarks use workers that simulate costs.

    Args:
        spec: what each actor is constructed with (`num_gpus` is set to the GPUs per worker it gets).
        batch_size: sequences per work unit (the workers' forward size: `search.batch_size`).
        seq_len: the calibration sequences' length (positions scored by a whole-sequence batch).
        num_gpus_per_worker: a number or "auto" (`resolve_gpus_per_worker`); every worker must fit on one
            node (`workers_that_fit`).
        call_timeout_s: a worker whose oldest call has run this long is taken as hung: it is killed and
            replaced and its units re-run (None: no limit).
        startup_timeout_s: how long an actor may take to be placed and set up: at the start (`prepare`) the
            pool fails; a replacement that is not ready in time is retired and the others go on.
    """

    def __init__(
        self,
        worker_class: type,
        spec: dict,
        num_workers: int,
        *,
        batch_size: int,
        seq_len: int,
        address: str | None = None,
        num_cpus_per_worker: float = 1,
        num_gpus_per_worker: float | str = "auto",
        allow_cpu_workers: bool = False,
        verbose: bool = False,
        max_retries: int = 2,
        call_timeout_s: float | None = None,
        startup_timeout_s: float = 900.0,
    ):
        _check_pool_options(num_workers, num_cpus_per_worker, num_gpus_per_worker, max_retries)
        if call_timeout_s is not None and not call_timeout_s > 0:
            raise TyrError(f"call_timeout_s must be > 0 or None, got {call_timeout_s}")
        self.worker_class = worker_class
        self.num_workers = num_workers
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.num_cpus = float(num_cpus_per_worker)
        self.max_retries = max_retries
        self.call_timeout_s = call_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.stats = RayStats()
        self.io = IOCounters()  # summed over the workers' completed calls
        self._closed = False
        self._last_error = ""
        self._shard_holders: dict[int, int] = {}  # build shard -> the slot holding it (`on_shards`)
        self._started_ray = connect(address, verbose=verbose)
        try:
            self.num_gpus = resolve_gpus_per_worker(
                num_gpus_per_worker, self._cluster_gpus(), allow_cpu_workers
            )
            _check_pool_options(num_workers, self.num_cpus, self.num_gpus, max_retries)
        except TyrError:
            self._shutdown_ray()
            raise
        self.spec = {**spec, "num_gpus": self.num_gpus}
        self._check_resources()
        logger.info(
            f"ray: {num_workers} worker(s) x ({self.num_cpus:g} CPU, {self.num_gpus:g} GPU) on "
            f"{_cluster_name(address, self._started_ray)}"
        )
        self.slots = [_Slot(i) for i in range(num_workers)]
        for slot in self.slots:
            self._start_actor(slot)

    # ---- actors --------------------------------------------------------------------------------------------
    def _cluster_gpus(self) -> float:
        return float(_ray().cluster_resources().get("GPU", 0.0))

    def _check_resources(self) -> None:
        """TyrError unless the cluster's alive nodes hold every worker at once, each on one node."""
        nodes = _ray().nodes()
        fit = workers_that_fit(nodes, self.num_cpus, self.num_gpus)
        if fit < self.num_workers:
            self._shutdown_ray()
            raise TyrError(
                f"the Ray cluster is too small for {self.num_workers} workers x ({self.num_cpus:g} CPU, "
                f"{self.num_gpus:g} GPU): its nodes hold {fit} such worker(s) at once, as each worker's resources "
                f"must come from one node ({_largest_node(nodes)}). Use fewer workers or smaller requests, or add "
                "nodes (see `ray status`)"
            )

    def _start_actor(self, slot: _Slot) -> None:
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "max_restarts": 0,  # replaced by the pool itself, so the new actor is set up before it gets work
            "max_task_retries": 0,
        }
        slot.actor = _actor_class(self.worker_class).options(**options).remote(self.spec)
        slot.generation += 1
        slot.ready_ref = None
        slot.tail = None
        slot.in_flight = 0
        slot.info = None
        slot.busy_since = None
        slot.setup_since = None

    def _retire(self, slot: _Slot, reason: str) -> None:
        """Stop using `slot` for the rest of the run (its actor killed; late answers are ignored)."""
        with contextlib.suppress(Exception):
            _ray().kill(slot.actor, no_restart=True)
        slot.retired, slot.actor, slot.ready_ref = True, None, None
        slot.generation += 1
        logger.warning(f"ray: worker {slot.index} retired ({reason})")

    def _replace_actor(self, slot: _Slot, error: BaseException) -> None:
        ray = _ray()
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        self._last_error = reason
        self.stats.failures += 1
        slot.consecutive_failures += 1
        with contextlib.suppress(Exception):  # already dead
            ray.kill(slot.actor, no_restart=True)
        if slot.consecutive_failures > self.max_retries:
            self._retire(slot, f"{slot.consecutive_failures} failures; the last: {reason}")
            return
        logger.warning(f"ray: worker {slot.index} died ({reason}); starting a replacement")
        self.stats.restarts += 1
        self._start_actor(slot)

    def _setup_refs(self, supernet: tuple[str, str]) -> dict:
        """Start set-up calls on actors that are not known to be ready; returns {ref: (slot, generation)}."""
        refs = {}
        for slot in self.slots:
            if slot.retired or slot.info is not None:
                continue
            if slot.ready_ref is None:
                slot.ready_ref = slot.actor.setup.remote(*supernet)
                slot.setup_since = time.monotonic()
            refs[slot.ready_ref] = (slot, slot.generation)
        return refs

    def _give_up_unplaced(self, setups: dict) -> None:
        """Retire workers whose set-up has not finished within `startup_timeout_s` (a replacement that no node
        can take, or a model load that hangs); drops their set-up refs from `setups`."""
        now = time.monotonic()
        for ref, (slot, generation) in list(setups.items()):
            if generation != slot.generation or slot.setup_since is None:
                continue
            if now - slot.setup_since > self.startup_timeout_s:
                del setups[ref]
                self._retire(
                    slot,
                    f"not ready {self.startup_timeout_s:.0f} s after it was started: not placed on any node, or "
                    "its set-up hangs; see `ray status`",
                )

    def _replace_hung(self) -> None:
        """Kill and replace workers whose oldest call has run longer than `call_timeout_s`; their calls then fail
        and their units go back to the queue (`_on_units_done`)."""
        if self.call_timeout_s is None:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.retired or slot.busy_since is None or now - slot.busy_since <= self.call_timeout_s:
                continue
            self._replace_actor(
                slot,
                TimeoutError(f"a call gave no answer in {self.call_timeout_s:g} s (backend.call_timeout_s)"),
            )

    def _on_setup_done(self, ref, slot: _Slot, generation: int) -> None:
        ray = _ray()
        if generation != slot.generation:
            return
        slot.ready_ref = None
        slot.setup_since = None
        try:
            slot.info = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            raise self._task_error(slot, e) from None
        except _crash_errors() as e:
            self._replace_actor(slot, e)
            return
        self.stats.workers = [s.info for s in self.slots if s.info is not None]
        info = slot.info
        logger.debug(
            f"ray: worker {slot.index} ready on {info['host']} (pid {info['pid']}, {info['device']}, "
            f"{info['threads']} threads, {info['seconds_setup']:.1f} s set-up)"
        )

    def prepare(self, supernet_dir: str | os.PathLike, fingerprint_hash: str) -> None:
        """Wait until every worker has loaded the model and opened `supernet_dir` (TyrError on failure/timeout)."""
        ray = _ray()
        supernet = (str(Path(supernet_dir).resolve()), fingerprint_hash)
        for slot in self.slots:  # ready actors open the new supernet too (errors show now, not mid-search)
            if not slot.retired and slot.ready_ref is None:
                slot.info = None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            refs = self._setup_refs(supernet)
            if not refs:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TyrError(
                    f"{len(refs)} Ray worker(s) not ready after {self.startup_timeout_s:.0f} s (not placed on "
                    "any node, or loading the model takes longer); see `ray status`"
                )
            done, _ = ray.wait(list(refs), num_returns=1, timeout=min(remaining, _WAIT_POLL_S))
            for ref in done:
                self._on_setup_done(ref, *refs[ref])
        if all(s.retired for s in self.slots):
            raise TyrError(f"every Ray worker died while starting (last error: {self._last_error})")
        for slot in self.slots:
            slot.tail = None  # a fresh SerialEvaluator on the supernet: the model is dense

    def _task_error(self, slot: _Slot, e) -> Exception:
        """An exception raised inside a worker: TyrError stays a TyrError (naming the worker), an OSError (a run
        directory the worker cannot read or write) becomes one; bugs keep theirs."""
        cause = getattr(e, "cause", None)
        where = f"Ray worker {slot.index}" + (f" on {slot.info['host']}" if slot.info else "")
        if isinstance(cause, TyrError):
            return TyrError(f"{where}: {cause}")
        if isinstance(cause, OSError):
            return TyrError(
                f"{where}: {cause}; the run directory must be readable and writable at the same path on every node"
            )
        return e

    # ---- evaluation ----------------------------------------------------------------------------------------
    def evaluate(
        self,
        supernet_dir: str | os.PathLike,
        fingerprint_hash: str,
        genomes: Sequence[Genome],
        batch: Batch,
        method: str = "evaluate",
    ) -> list[float]:
        """Fitness of each genome on `batch` (candidate order): its units spread over the workers, each
        candidate's per-sequence sums reduced in sequence order."""
        if self._closed:
            raise TyrError("this Ray evaluator is closed")
        t0 = time.perf_counter()
        supernet = (str(Path(supernet_dir).resolve()), fingerprint_hash)
        batch = as_batch(batch)
        positions = batch.positions(self.seq_len)
        payload_batch = batch.to_json()
        queue = WorkQueue(genomes, unit_blocks(len(batch.sequences), self.batch_size), self.max_retries + 1)

        def dispatch(in_flight: dict) -> None:
            for slot, units in assign(queue, self._ready_slots(), PIPELINE_DEPTH):
                payload = [[list(queue.unique[c]), *queue.blocks[b]] for c, b in units]
                ref = getattr(slot.actor, method).remote(*supernet, payload, payload_batch)
                in_flight[ref] = (slot, slot.generation, units)
                if slot.busy_since is None:
                    slot.busy_since = time.monotonic()
                self.stats.chunks += 1

        self._drive(
            supernet,
            lambda: bool(queue.pending),
            dispatch,
            lambda ref, call: self._on_units_done(ref, *call, queue),
        )
        self.stats.calls += 1
        self.stats.evaluations += len(queue.unique)
        self.stats.seconds += time.perf_counter() - t0
        return queue.results(positions)

    def map(self, method: str, tasks: Sequence[tuple], keep: bool = False) -> list:
        """`worker.method(*task)` for every task, spread over the workers (at most `PIPELINE_DEPTH` calls in
        flight per worker), results in task order. Workers need only the model and the kept windows (no supernet).
        A task whose worker dies is re-run elsewhere (up to `max_retries` times); a hung worker is replaced after
        `call_timeout_s`; an error raised inside a task stops the map.

        `keep`: the method returns two values, a small one the driver fetches (to know the task succeeded) and a
        large one left in the cluster's object store: the results are references to the large ones, which other
        tasks take as arguments (Ray moves the data between the workers' nodes, never through the driver)."""

        def any_worker(_task: int, ready: list[_Slot]) -> _Slot | None:
            return next((s for s in ready if s.in_flight < PIPELINE_DEPTH), None)

        return self._run_tasks(method, tasks, any_worker, keep)

    def on_shards(self, method: str, calls: Sequence[tuple], keep: bool = False) -> list:
        """`worker.method(*calls[k])` on the worker holding shard k (worker k mod the pool's size at first; the
        shard of a retired worker moves to the ready worker holding the fewest shards), results in shard order.
        Calls must be self-contained: a replacement (or a new holder) rebuilds the shard before the step. A call
        whose worker dies is re-run on its replacement, up to `max_retries` times."""

        def holder(k: int, ready: list[_Slot]) -> _Slot | None:
            slot = self.slots[self._shard_holders.setdefault(k, k % self.num_workers)]
            if slot.retired and ready:
                load = collections.Counter(self._shard_holders.values())
                slot = min(ready, key=lambda s: (load[s.index], s.index))
                logger.warning(f"ray: shard {k} moves to worker {slot.index} (its worker is retired)")
                self._shard_holders[k] = slot.index
            return slot if slot in ready else None

        return self._run_tasks(method, calls, holder, keep)

    def put(self, value: Any) -> Any:
        """`value` in the cluster's object store once, for every task that takes it (pass the reference)."""
        return _ray().put(value)

    def _run_tasks(
        self,
        method: str,
        tasks: Sequence[tuple],
        choose: Callable[[int, list[_Slot]], _Slot | None],
        keep: bool = False,
    ) -> list:
        """`worker.method(*tasks[i])` for every i on the worker `choose(i, ready workers)` names (None: not yet);
        `keep` as in `map`."""
        if self._closed:
            raise TyrError("this Ray pool is closed")
        ray = _ray()
        pending = list(range(len(tasks)))
        failures = [0] * len(tasks)
        results: list = [None] * len(tasks)
        kept: dict[int, Any] = {}  # keep: task -> the reference to its large value

        def dispatch(in_flight: dict) -> None:
            ready = self._ready_slots()
            for i in list(pending):
                slot = choose(i, ready)
                if slot is None:
                    continue
                pending.remove(i)
                call = getattr(slot.actor, method)
                if keep:
                    status, kept[i] = call.options(num_returns=2).remote(*tasks[i])
                else:
                    status = call.remote(*tasks[i])
                in_flight[status] = (slot, slot.generation, i)
                slot.in_flight += 1
                slot.busy_since = slot.busy_since or time.monotonic()

        def on_done(ref, call: tuple[_Slot, int, int]) -> None:
            slot, generation, i = call
            try:
                value = ray.get(ref)  # with keep, the small value: it raises when the task failed
                results[i] = kept.pop(i) if keep else value
            except ray.exceptions.RayTaskError as e:
                raise self._task_error(slot, e) from None
            except _crash_errors() as e:
                failures[i] += 1
                if failures[i] > self.max_retries:
                    raise TyrError(f"{method} task {i} failed {failures[i]} times (last: {e})") from None
                pending.insert(0, i)
                if generation == slot.generation:
                    self._replace_actor(slot, e)
                return
            if generation == slot.generation:
                slot.in_flight -= 1
                slot.consecutive_failures = 0
                slot.busy_since = time.monotonic() if slot.in_flight else None

        self._drive((None, None), lambda: bool(pending), dispatch, on_done)
        return results

    def _drive(
        self,
        supernet: tuple,
        pending: Callable[[], bool],
        dispatch: Callable[[dict], None],
        on_done: Callable[[Any, tuple], None],
    ) -> None:
        """The pool's loop: hand work to ready workers (`dispatch` adds {ref: call} to the in-flight dict), take
        each answer (`on_done`) and each finished set-up, replace hung workers and retire unplaced ones, until
        nothing is `pending` or in flight. Workers are set up for `supernet` ((None, None): model only)."""
        ray = _ray()
        in_flight: dict[Any, tuple] = {}
        setups = self._setup_refs(supernet)
        while pending() or in_flight:
            dispatch(in_flight)
            if not in_flight and not setups:
                self._check_not_all_retired()
                setups = self._setup_refs(supernet)
                continue
            done, _ = ray.wait(list(in_flight) + list(setups), num_returns=1, timeout=_WAIT_POLL_S)
            for ref in done:
                if ref in setups:
                    self._on_setup_done(ref, *setups.pop(ref))
                else:
                    on_done(ref, in_flight.pop(ref))
            self._replace_hung()
            setups.update(self._setup_refs(supernet))
            self._give_up_unplaced(setups)
            self._check_not_all_retired()

    def _on_units_done(self, ref, slot: _Slot, generation: int, units: list, queue: WorkQueue) -> None:
        """Record a call's sums and I/O, or put its units back when its worker died (replacing the worker)."""
        ray = _ray()
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            raise self._task_error(slot, e) from None
        except _crash_errors() as e:
            queue.requeue(units, worker=slot.index)
            if generation == slot.generation:  # the first failure seen from this actor
                self._replace_actor(slot, e)
            return
        if generation == slot.generation:
            slot.in_flight -= 1
            slot.consecutive_failures = 0
            slot.busy_since = time.monotonic() if slot.in_flight else None  # its next call starts now
        queue.complete(units, result["sums"])
        self.stats.units += len(units)
        self.io = self.io + IOCounters.from_json(result["io"])

    def _check_not_all_retired(self) -> None:
        if all(s.retired for s in self.slots):
            raise TyrError(
                f"every Ray worker failed more than max_retries times (last error: {self._last_error})"
            )

    def _ready_slots(self) -> list[_Slot]:
        """Workers that have loaded everything and take work."""
        return [s for s in self.slots if not s.retired and s.info is not None]

    # ---- closing -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Kill the actors; shut Ray down only when this pool started the local instance."""
        if self._closed:
            return
        self._closed = True
        ray = _ray()
        if ray.is_initialized():
            for slot in self.slots:
                if slot.actor is not None:
                    with contextlib.suppress(Exception):
                        ray.kill(slot.actor, no_restart=True)
                    slot.actor = None
        self._shutdown_ray()

    def _shutdown_ray(self) -> None:
        if self._started_ray:
            self._started_ray = False
            _ray().shutdown()


class RayWorkerPool(ActorPool):
    """`num_workers` long-lived actors that evaluate candidates of any supernet of one run (`_Worker`).

    Kept alive across iterations (the model is loaded once per actor); `evaluate` carries the supernet's
    directory and fingerprint with every call, so an actor swaps supernets (and a restarted actor catches up)
    by itself.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | os.PathLike,
        num_workers: int,
        *,
        num_cpus_per_worker: float = 1,
        num_threads: int | None = None,
        fault_file: str | None = None,
        hang_file: str | None = None,
        model_dtype: Any = None,
        **pool_options: Any,
    ):
        """`pool_options`: `ActorPool`'s (address, num_gpus_per_worker, call_timeout_s, ...); `num_threads`: torch
        threads per actor (default: int(num_cpus_per_worker)); `model_dtype`: the driver's model dtype, which every
        worker loads (the run's: it is in every supernet's fingerprint; None: model.dtype as each worker resolves
        it); `fault_file`/`hang_file`: test hooks."""
        _check_pool_options(
            num_workers,
            num_cpus_per_worker,
            pool_options.get("num_gpus_per_worker", "auto"),
            pool_options.get("max_retries", 2),
        )
        self.run_dir = Path(run_dir).resolve()
        run = RunDir(self.run_dir)
        if not run.has_teacher() and not run.tokens_path("calibration").is_file():
            raise TyrError(
                f"{self.run_dir} holds neither teacher targets nor kept windows: not a run directory"
            )
        self.num_threads = int(num_threads) if num_threads else max(1, int(num_cpus_per_worker))
        config = _shippable_config(cfg)
        if model_dtype is not None:
            config["model"]["dtype"] = str(model_dtype).removeprefix("torch.")
        config["backend"]["driver_device"] = "auto"  # the driver's setting: a worker loads on its own device
        spec = {
            "config": config,
            "run_dir": str(self.run_dir),
            "num_threads": self.num_threads,
            "num_workers": num_workers,
            "fault_file": fault_file,
            "hang_file": hang_file,
        }
        super().__init__(
            _Worker,
            spec,
            num_workers,
            batch_size=cfg.search.batch_size,
            seq_len=cfg.data.seq_len,
            num_cpus_per_worker=num_cpus_per_worker,
            **pool_options,
        )


def _check_pool_options(
    num_workers: int, num_cpus_per_worker: float, num_gpus_per_worker: float | str, max_retries: int
) -> None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise TyrError(f"the Ray backend needs num_workers >= 1, got {num_workers!r}")
    if num_gpus_per_worker == "auto":
        num_gpus_per_worker = 0
    elif isinstance(num_gpus_per_worker, str):
        raise TyrError(f"num_gpus_per_worker must be auto or a number, got {num_gpus_per_worker!r}")
    if num_cpus_per_worker < 0 or num_gpus_per_worker < 0:
        raise TyrError("num_cpus_per_worker and num_gpus_per_worker must be >= 0")
    if num_gpus_per_worker > 1 and num_gpus_per_worker != int(num_gpus_per_worker):
        raise TyrError(f"num_gpus_per_worker above 1 must be a whole number, got {num_gpus_per_worker}")
    if max_retries < 0:
        raise TyrError(f"max_retries must be >= 0, got {max_retries}")


def _cluster_name(address: str | None, started: bool) -> str:
    """Where the workers run, for the log: the local instance this process started, or the cluster joined."""
    ray = _ray()
    gcs = ""
    with contextlib.suppress(Exception):  # not every connection mode exposes it (Ray Client)
        gcs = ray.get_runtime_context().gcs_address
    at = f" ({gcs})" if gcs else ""
    if started:
        return f"a local Ray instance started for this run{at}"
    joined = address or os.environ.get("RAY_ADDRESS")
    if joined is None:
        return f"the Ray instance this process was already connected to{at}"
    return f"the Ray cluster at {joined}" + (at if gcs != joined else "")


def _crash_errors() -> tuple[type[BaseException], ...]:
    """Ray errors that mean the worker process or its node went away (the work is redone elsewhere)."""
    ex = _ray().exceptions
    names = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "ObjectLostError")
    return tuple(getattr(ex, n) for n in names if hasattr(ex, n))


class RayEvaluator:
    """The fitness protocol of `SerialEvaluator` (`__call__(genomes, batch) -> list[float]`) on Ray.

    With `pool=None` it starts (and on `close` kills) its own workers; with a shared `RayWorkerPool` (see
    `ray_evaluator_factory`) `close` leaves the workers running for the next supernet.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | os.PathLike,
        supernet_dir: str | os.PathLike,
        num_workers: int = 1,
        address: str | None = None,
        num_cpus_per_worker: float = 1,
        num_gpus_per_worker: float | str = "auto",
        verbose: bool = False,
        max_retries: int = 2,
        num_threads: int | None = None,
        pool: RayWorkerPool | None = None,
        **pool_options: Any,
    ):
        from tyr.supernet.store import SupernetStore

        self.supernet_dir = Path(supernet_dir).resolve()
        self.fingerprint_hash = SupernetStore.open(self.supernet_dir).fingerprint_hash
        self._owns_pool = pool is None
        self.pool = pool or RayWorkerPool(
            cfg,
            run_dir,
            num_workers,
            address=address,
            num_cpus_per_worker=num_cpus_per_worker,
            num_gpus_per_worker=num_gpus_per_worker,
            verbose=verbose,
            max_retries=max_retries,
            num_threads=num_threads,
            **pool_options,
        )
        try:
            self.pool.prepare(self.supernet_dir, self.fingerprint_hash)
        except BaseException:
            if self._owns_pool:
                self.pool.close()
            raise
        self.num_evaluations = 0
        self._io_base = self.pool.io

    @property
    def stats(self) -> RayStats:
        return self.pool.stats

    @property
    def io_counters(self) -> IOCounters:
        """The workers' I/O for this evaluator's calls, summed."""
        return self.pool.io - self._io_base

    def __call__(self, genomes: Sequence[Genome], batch: Batch) -> list[float]:
        values = self.pool.evaluate(self.supernet_dir, self.fingerprint_hash, genomes, batch)
        self.num_evaluations += len(genomes)
        return values

    def close(self) -> None:
        """Kill the workers (own pool) or leave them for the next supernet (shared pool)."""
        if self._owns_pool:
            self.pool.close()


class RayEvaluatorFactory:
    """`factory(supernet_dir) -> RayEvaluator` over one worker pool kept for the whole run; `close()` at the end."""

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike, num_workers: int, **pool_options: Any):
        self.cfg, self.run_dir, self.num_workers = cfg, run_dir, num_workers
        self.pool_options = pool_options
        self.pool: RayWorkerPool | None = None

    def __call__(self, supernet_dir: str | os.PathLike) -> RayEvaluator:
        return RayEvaluator(self.cfg, self.run_dir, supernet_dir, pool=self.workers())

    def workers(self) -> RayWorkerPool:
        """The pool, started on first use."""
        if self.pool is None:
            self.pool = RayWorkerPool(self.cfg, self.run_dir, self.num_workers, **self.pool_options)
        return self.pool

    def teacher_fill(self, what: str = "calibration") -> Callable[[dict, list[tuple[int, int]]], None]:
        """`compute_and_save_teacher_targets(fill=...)` on the workers for the run's kept `what` windows: one
        task per block of sequences."""

        def fill(layout: dict, blocks: list[tuple[int, int]]) -> None:
            self.workers().map("teacher_rows", [(layout, start, stop, what) for start, stop in blocks])

        return fill

    def final_metrics(
        self, first: Any, last: Any, genome: Sequence[int], eval_tokens: Any, parts: Sequence[str]
    ) -> list[dict]:
        """`tyr.run.measure_part` for each of `parts` on the workers, in parallel: the supernets `first` and
        `last` are stores the driver verified."""
        supernets = [[str(Path(s.directory).resolve()), s.fingerprint_hash] for s in (first, last)]
        tokens = self.workers().put(eval_tokens.numpy())  # once, for every part
        calls = [(part, *supernets, [int(v) for v in genome], tokens) for part in parts]
        return self.workers().map("final_metrics", calls)

    def build_supernet(
        self, adapter: Any, num_sequences: int, plan: Any, store: Any, progress: bool = True
    ) -> Any:
        """The iteration's supernet built on the workers (`tyr.cluster_build`); a `BuildReport`."""
        from tyr.cluster_build import build_on_workers

        return build_on_workers(self.workers(), adapter, num_sequences, plan, store, progress)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def ray_evaluator_factory(
    cfg: RunConfig, run_dir: str | os.PathLike, verbose: bool = False, model_dtype: Any = None
) -> RayEvaluatorFactory:
    """What `tyr.run` needs: a callable giving each iteration's evaluator, the actors (`cfg.backend`) loaded once
    per run, in the driver's `model_dtype` (a torch dtype; None: model.dtype as each worker resolves it)."""
    b = cfg.backend
    return RayEvaluatorFactory(
        cfg,
        run_dir,
        b.num_workers,
        model_dtype=model_dtype,
        address=b.address,
        num_cpus_per_worker=b.num_cpus_per_worker,
        num_gpus_per_worker=b.num_gpus_per_worker,
        allow_cpu_workers=b.allow_cpu_workers,
        verbose=verbose,
        max_retries=b.max_retries,
        call_timeout_s=b.call_timeout_s,
        startup_timeout_s=b.startup_timeout_s,
    )
