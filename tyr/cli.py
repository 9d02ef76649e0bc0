"""`tyr` command line: a thin layer over the Python API in `tyr.pipeline`.

Every subcommand takes the global options `--log-level`, `--quiet`, `--verbose` and `--debug` (before or after
its name); `tyr.logs` says what goes to stdout and what to stderr. Exit codes: 0 done; 2 a user mistake
(TyrError) or an expected environment failure (disk full, no permission, a corrupt file), each one line
`tyr: error: ...`; 1 an unexpected error, one line `tyr: internal error: ...` (`--debug` adds the traceback);
130 Ctrl-C, after which the same command resumes.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from tyr import __version__, logs
from tyr.config import RunConfig, resolve_config
from tyr.errors import TyrError
from tyr.methods import METHODS

_FLAG_KEYS = {
    "model": "model.name",
    "schedule": "schedule",
    "data": "data.calibration",
    "eval_data": "data.eval",
    "sparsity": "sparsity",
    "seed": "seed",
    "device": "model.device",
    "dtype": "model.dtype",
    "method": "search.method",
    "criterion": "supernet.criterion",
}


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (optional; flags and --set override it)")
    p.add_argument("--model", help="local HF folder, hub id, or built-in alias smollm2-135m")
    p.add_argument(
        "--data", help="calibration data: lee-background, a local file/folder, or a datasets hub name"
    )
    p.add_argument("--eval-data", help="held-out data for perplexity (default: lee)")
    p.add_argument("--sparsity", type=float, help="fraction of prunable units to remove, in [0, 1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    p.add_argument(
        "--method",
        help="allocation method (default evolution): "
        + "; ".join(f"{name} = {cls.description}" for name, cls in METHODS.items()),
    )
    p.add_argument("--criterion", help="local pruning criterion: tyr (default), magnitude, wanda-sp, flap")
    p.add_argument("--schedule", help="preset the config starts from: paper, cpu (default) or smoke")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set supernet.accumulation=none (repeatable)",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    _add_config_options(p)
    p.add_argument("--out", required=True, help="run directory (re-running the same command resumes)")
    p.add_argument(
        "--force",
        action="store_true",
        help="discard a run with another config in --out (only a folder Tyr wrote is ever deleted)",
    )


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = [
        f"{key}={getattr(args, flag)}"
        for flag, key in _FLAG_KEYS.items()
        if getattr(args, flag, None) is not None
    ]
    workers, address = getattr(args, "workers", None), getattr(args, "ray_address", None)
    if workers is not None or address is not None:
        overrides.append("backend.kind=ray")
    if workers is not None:
        overrides.append(f"backend.num_workers={workers}")
    if address is not None:
        overrides.append(f"backend.address={json.dumps(address)}")  # quoted: YAML would read 1:20 as a number
    return resolve_config(args.config, overrides + args.overrides)


def cmd_build(args: argparse.Namespace) -> int:
    """Build iteration 1's supernet around the target sparsity and print what was built."""
    from tyr import pipeline
    from tyr.rundir import RunDir

    cfg = _config_from_args(args)
    progress = logs.progress_bars(args.quiet)
    with RunDir(args.out).lock() as locked:
        run, session = pipeline.open_run(cfg, locked, args.force, progress=progress, with_eval=False)
        centres = pipeline.uniform_centres(session.adapter, cfg)
        store, report = pipeline.build_iteration_supernet(
            session, run.supernet_dir(1), centres, iteration=1, progress=progress
        )
    print(pipeline.describe_supernet(session, store, report))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline; re-running the same command resumes."""
    from tyr.run import run
    from tyr.rundir import RunDir

    cfg = _config_from_args(args)
    run(cfg, args.out, force=args.force, progress=logs.progress_bars(args.quiet), verbose=args.verbose)
    done = RunDir(args.out)
    print(f"[tyr] done: {done.architecture_path}, {done.metrics_path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """What a run with this config needs, per phase (estimates from the model's shapes)."""
    from tyr.plan import HARDWARE, Budget, format_plan, make_plan

    for name in ("gpu_memory", "host_memory", "disk"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise TyrError(f"--{name.replace('_', '-')} must be a positive number of GB, got {value}")
    if args.gpu not in HARDWARE:
        raise TyrError(f"unknown --gpu {args.gpu!r}; choose one of {', '.join(HARDWARE)}")
    default_memory = HARDWARE[args.gpu].memory_gb or None
    budget = Budget(args.gpu_memory or default_memory, args.host_memory, args.disk)
    plan = make_plan(_config_from_args(args), args.gpu, budget, num_gpus=args.gpus)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tyr.status import run_progress, run_status

    if args.json:
        print(json.dumps(run_progress(args.run).to_json(), indent=2))
    else:
        print("\n".join(run_status(args.run)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tyr.report import write_report

    print(f"[tyr] report: {write_report(args.run, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tyr", description="Global structural pruning of LLMs (Týr-the-Pruner)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the supernet (ladder of locally pruned variants per module)")
    _add_run_options(build)
    build.set_defaults(func=cmd_build)
    run = sub.add_parser(
        "run", help="whole pipeline: teacher, coarse-to-fine supernet + search, final metrics"
    )
    _add_run_options(run)
    run.add_argument("--workers", type=int, help="evaluate fitness on N Ray workers (starts a local Ray)")
    run.add_argument(
        "--ray-address", help="join an existing Ray cluster: auto, host:6379 or ray://host:10001"
    )
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="where a run stands: stage, generation, best fitness, time left")
    status.add_argument("run", help="run directory")
    status.add_argument(
        "--json",
        action="store_true",
        help="one JSON object: stage, iteration, generation, best_fitness, eta_s, finished, per-iteration detail",
    )
    status.set_defaults(func=cmd_status)
    report = sub.add_parser("report", help="report.md and plots (allocation, fitness) for a run directory")
    report.add_argument("run", help="run directory")
    report.add_argument("--out", help="folder for report.md and plots/ (default: the run directory)")
    report.set_defaults(func=cmd_report)
    plan = sub.add_parser(
        "plan",
        help="device memory, host RAM, disk and time per phase of a run, from the model's shapes alone",
        description="What `tyr run` with the same config and flags would need (estimates; no weights, no data).",
    )
    _add_config_options(plan)
    plan.add_argument("--gpu", default="h100", help="h100 (default), a100, mi250 or cpu: rates for the times")
    plan.add_argument("--gpu-memory", type=float, help="GB of memory per GPU (default: the --gpu's)")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs per process (with model.placement=balanced)")
    plan.add_argument("--host-memory", type=float, help="GB of host RAM (checked when given)")
    plan.add_argument("--disk", type=float, help="GB of free disk for the run directory (checked when given)")
    plan.add_argument("--json", action="store_true", help="one JSON object: phases, totals, fits, advice")
    plan.set_defaults(func=cmd_plan)
    from tyr.evaluate import add_eval_parser
    from tyr.export import add_export_parser

    add_export_parser(sub)
    add_eval_parser(sub)
    parser.add_argument("--version", action="version", version=f"tyr {__version__}")
    _add_global_options(parser, argparse.SUPPRESS)
    parser.set_defaults(log_level=None, quiet=False, verbose=False, debug=False)
    for command in sub.choices.values():
        _add_global_options(command, argparse.SUPPRESS)  # SUPPRESS: `tyr --quiet run` is not undone
    return parser


def _add_global_options(p: argparse.ArgumentParser, default) -> None:
    """Options every subcommand takes, before or after its name (`tyr --quiet run ...`, `tyr run --quiet`)."""
    group = p.add_argument_group("output (every command)")
    group.add_argument(
        "--log-level", choices=list(logs.LEVELS), default=default, help="show messages from this level up"
    )
    verbosity = group.add_mutually_exclusive_group()
    verbosity.add_argument(
        "--quiet", action="store_true", default=default, help="warnings and errors only; no progress bars"
    )
    verbosity.add_argument(
        "--verbose", action="store_true", default=default, help="debug messages, and Ray's own logs"
    )
    group.add_argument(
        "--debug", action="store_true", default=default, help="also print the traceback of an error"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(logs.level_for(args.log_level, args.quiet, args.verbose))
    if not logs.progress_bars(args.quiet):
        logs.silence_library_bars()
    previous = _on_sigterm(_terminate)
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        out = getattr(args, "out", None)
        where = f" (state in {Path(out)})" if out else ""
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"\ntyr: {what}{where}; re-run the same command to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except BrokenPipeError:  # `tyr plan | head`: the reader left; no message, no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        return _report_error(e, args)
    finally:
        _on_sigterm(previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop): unwinds like Ctrl-C, so workers stop and files stay whole."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _on_sigterm(handler):
    """Install `handler` for SIGTERM (main thread only); returns the previous one (None when not installed)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _report_error(e: Exception, args: argparse.Namespace) -> int:
    """One line on stderr: exit 2 for user and environment errors, 1 for anything else (a bug)."""
    if args.debug:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    message = _expected_error(e, getattr(args, "out", None) or getattr(args, "run", None))
    if message is not None:
        print(f"tyr: error: {message}", file=sys.stderr)
        return 2
    hint = "" if args.debug else " (rerun with --debug for the traceback)"
    print(f"tyr: internal error: {type(e).__name__}: {_one_line(e)}{hint}", file=sys.stderr)
    return 1


def _expected_error(e: Exception, where: str | None) -> str | None:
    """The message for a user mistake or an environment failure; None for an unexpected error."""
    import yaml
    from safetensors import SafetensorError

    if isinstance(e, TyrError):
        return str(e)
    if isinstance(e, OSError):
        return _os_error(e, where)
    if isinstance(e, SafetensorError):
        return (
            f"cannot read a safetensors file ({_one_line(e)}): it is corrupt or truncated; delete it (or the "
            "folder holding it) and re-run"
        )
    if isinstance(e, yaml.YAMLError):
        return f"invalid YAML: {_one_line(e)}"
    if isinstance(e, json.JSONDecodeError):
        return f"a JSON file is corrupt ({_one_line(e)}); delete or restore it (--debug shows which one)"
    return None


def _os_error(e: OSError, where: str | None) -> str:
    """What failed, on which path, and what to do about it (`where`: the command's output, when known)."""
    at = f" ({e.filename})" if e.filename is not None else ""
    if e.errno == errno.ENOSPC:  # a failed write() names no file: say where the command was writing
        at = at or (f" (writing under {where})" if where is not None else "")
        return (
            f"no space left on device{at}: free some space or use a larger disk, then re-run the same command "
            "(a run resumes where it stopped)"
        )
    if isinstance(e, PermissionError):
        return f"permission denied{at}: make it accessible to this user, or choose another path"
    if e.errno == errno.EROFS:
        return f"read-only file system{at}: choose a writable path"
    what = e.strerror or _one_line(e) or type(e).__name__
    return f"{what}{at}"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
