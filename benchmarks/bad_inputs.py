"""Replay the reliability checklist (131 bad inputs and faults tried against Tyr at commit 699d6f1, rows c01-y-r7)
against the current code, and say for each row what happens now.

Everything runs offline on CPU, on the tests' tiny Llama-GQA checkpoint (tests/tiny.py) with the `smoke` schedule,
through the real command line (`python -m tyr.cli` in a subprocess, with a timeout: no exit in time = "hang").
`$B` = `--model <tiny> --data calib.txt --eval-data heldout.txt --schedule smoke --sparsity 0.5 --quiet`. One
finished reference run R (and its export E) is made first; rows that damage a run work on a copy of it.

Verdicts (worst first): hang; security (a file outside the run was written or read into an export, or a payload
ran); data loss (a model / foreign folder / finished run / user file changed, or a silently wrong result);
bad error (a traceback, exit 1 on a user error, several error lines, bad input accepted, a message that misleads,
or a run left stuck); ok (exit 0 where success is right, or exit 2 with one `tyr: error:` line, no traceback,
and the state safe). Rows whose old behaviour was success (d03 latin-1 text, k01 resume after SIGKILL, ...) are ok
when the run succeeds with the reference result.

    python -m benchmarks.bad_inputs [--only c03,m,k0] [--jobs 2] [--keep]

`--only` takes ids or id prefixes; `--jobs` runs that many rows at a time (each row works in its own folders);
`--keep` leaves the temp folder. Prints a markdown table, a summary over the checklist's rows, the rows that are
not ok with a command to reproduce them, and writes benchmarks/results/bad_inputs.json. One row is added beyond
the checklist: o06+ (a foreign --out folder holding another program's `.*.tmp` file). Rows that need root-less
users, tmpfs mounts or a Ray cluster are listed as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import write_results

# The checklist's row ids (131 rows, tried at commit 699d6f1), in its order.
CHECKLIST_IDS = (
    "c01",
    "c02",
    "c03",
    "c04",
    "c05",
    "c06",
    "c07",
    "c08",
    "c09",
    "m01",
    "m02",
    "m03",
    "m04",
    "m05",
    "m06",
    "m07",
    "m08",
    "m09",
    "m10",
    "d01",
    "d02",
    "d03",
    "d04",
    "d05",
    "d06",
    "d07",
    "d08",
    "d09",
    "d10",
    "d11",
    "d12",
    "d13",
    "d14",
    "d15",
    "s01",
    "s02",
    "s03",
    "s04",
    "s05",
    "s06",
    "s07",
    "s08",
    "s09",
    "s10",
    "s11",
    "s12",
    "s13",
    "s14",
    "s15",
    "s16",
    "s17",
    "s18",
    "s19",
    "s20",
    "s21",
    "y01",
    "y02",
    "y03",
    "y04",
    "y05",
    "y06",
    "y07",
    "y08",
    "y09",
    "y10",
    "o01",
    "o02",
    "o03",
    "o04",
    "o05",
    "o06",
    "o07",
    "o08",
    "o09",
    "o10",
    "o11",
    "o12",
    "o13",
    "f01",
    "f02",
    "f03",
    "k01",
    "k02",
    "k03",
    "k04",
    "k05",
    "k06",
    "k07",
    "k08",
    "k09",
    "k10",
    "k11",
    "r01",
    "r02",
    "r03",
    "r04",
    "r05",
    "r06",
    "r07",
    "r08",
    "r09",
    "r10",
    "r11",
    "r12",
    "h01",
    "h02",
    "h03",
    "h04",
    "h05",
    "h06",
    "h07",
    "h08",
    "v01",
    "v02",
    "v03",
    "v04",
    "t01",
    "t02",
    "t03",
    "t04",
    "t05",
    "x01",
    "x02",
    "b01",
    "y-r1",
    "y-r2",
    "y-r3",
    "y-r4",
    "y-r5",
    "y-r6",
    "y-r7",
)
VERDICTS = ("ok", "bad error", "data loss", "security", "hang")  # least to most severe
ERROR_LINE = re.compile(r"^tyr(?: [\w-]+)?: error: ")
QUICK, RUN_TIMEOUT = 60, 180  # seconds: commands that fail up front / commands that run the pipeline
ENV = {
    **os.environ,
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "MPLBACKEND": "Agg",
}


# -- running tyr --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One finished (or timed-out) `tyr` command."""

    argv: list[str]
    rc: int | None  # None: no exit within the timeout (killed)
    stdout: str
    stderr: str
    seconds: float

    @property
    def hung(self) -> bool:
        return self.rc is None

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stdout + self.stderr

    @property
    def last_line(self) -> str:
        for text in (self.stderr, self.stdout):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if lines:
                return lines[-1]
        return ""

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if ERROR_LINE.match(line.strip())]

    @property
    def clean_error(self) -> bool:
        """Exit 2, no traceback, the last line `tyr: error: ...` (argparse: `tyr run: error: ...`), only one."""
        return (
            self.rc == 2
            and not self.traceback
            and bool(ERROR_LINE.match(self.last_line))
            and len(self.error_lines()) == 1
        )

    @property
    def text(self) -> str:
        return self.stdout + self.stderr


def _decode(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


class Tyr:
    """Runs `python -m tyr.cli ...` with the offline environment, in an empty working folder by default."""

    def __init__(self, root: Path):
        self.root = root
        self.cwd = root / "cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.env = {**ENV, "TYR_CACHE": str(root / "tyr-cache")}

    def argv(self, *args: object) -> list[str]:
        return [sys.executable, "-m", "tyr.cli", *map(str, args)]

    def __call__(self, *args: object, timeout: float = RUN_TIMEOUT, cwd: Path | None = None) -> Result:
        argv = self.argv(*args)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(
                argv, capture_output=True, timeout=timeout, cwd=cwd or self.cwd, env=self.env, check=False
            )
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:  # subprocess.run has SIGKILLed it
            rc, out, err = None, e.stdout, e.stderr
        return Result(argv, rc, _decode(out), _decode(err), time.perf_counter() - t0)

    def popen(self, *args: object, cwd: Path | None = None) -> tuple[subprocess.Popen, list[str], float]:
        argv = self.argv(*args)
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd or self.cwd, env=self.env
        )
        return proc, argv, time.perf_counter()

    def wait(
        self, proc: subprocess.Popen, argv: list[str], t0: float, timeout: float = RUN_TIMEOUT
    ) -> Result:
        try:
            out, err = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            rc = None
        return Result(argv, rc, _decode(out), _decode(err), time.perf_counter() - t0)

    def signal_when(
        self,
        args: list[object],
        event: Callable[[], bool],
        sig: int = signal.SIGKILL,
        delay: float = 0.0,
        timeout: float = RUN_TIMEOUT,
    ) -> tuple[Result, bool]:
        """Start `tyr *args`, send `sig` as soon as `event()` holds (polled every 2 ms; `delay` s later);
        (result, whether the signal was sent before the command ended on its own)."""
        proc, argv, t0 = self.popen(*args)
        fired = False
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if event():
                if delay:
                    time.sleep(delay)
                if proc.poll() is None:
                    proc.send_signal(sig)
                    fired = True
                break
            time.sleep(0.002)
        return self.wait(proc, argv, t0, timeout), fired


# -- folders ------------------------------------------------------------------------------------------------------


def snapshot(folder: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Every entry under `folder` (not following links): file sha256, link target, 'dir' or 'special'."""
    if folder.is_symlink():
        return {".": "link:" + os.readlink(folder)}
    if not folder.exists():
        return {}
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    entries = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if name in ignore:
                continue
            if p.is_symlink():
                entries[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                entries[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                entries[rel] = "dir"
            else:
                entries[rel] = "special"
    return entries


def changes(before: dict[str, str], after: dict[str, str]) -> str:
    gone = sorted(set(before) - set(after))
    new = sorted(set(after) - set(before))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = [
        f"{what}: {', '.join(names[:4])}"
        for what, names in (("gone", gone), ("new", new), ("changed", changed))
        if names
    ]
    return "; ".join(parts)


def signature(run: Path) -> dict:
    """What "identical" compares: final/*.json, iter-*/result.json and history.jsonl minus its telemetry (the
    seconds and the I/O counters of the process that ran each generation: a resumed process starts with a
    dense model and a warm cache, so it reads and swaps differently for the same results)."""
    sig: dict[str, object] = {}
    for rel in ("final/architecture.json", "final/metrics.json", "final/selection.json"):
        p = run / rel
        sig[rel] = p.read_text() if p.is_file() else None
    for p in sorted(run.glob("iter-*/result.json")):
        sig[str(p.relative_to(run))] = p.read_text()
    for p in sorted(run.glob("iter-*/search/history.jsonl")):
        lines = []
        for line in p.read_text().splitlines():
            try:
                record = json.loads(line)
                record.pop("seconds", None)
                record.pop("io", None)
                lines.append(record)
            except ValueError:
                lines.append(line)
        sig[str(p.relative_to(run))] = lines
    return sig


def signature_difference(got: dict, want: dict) -> str:
    keys = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    return ", ".join(keys)


FINAL_KEYS = ("final/architecture.json", "final/metrics.json", "final/selection.json")


def describe_difference(got: dict, want: dict, key: str) -> str:
    """Which fields of one signature entry differ (JSON objects), else just the entry's name."""
    try:
        a, b = json.loads(got.get(key) or "null"), json.loads(want.get(key) or "null")
    except (TypeError, ValueError):
        return key
    if isinstance(a, dict) and isinstance(b, dict):
        fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f"{key} ({', '.join(f'{f}: {a.get(f)!r} vs {b.get(f)!r}' for f in fields[:3])})"
    return key


def compare(row: Row, got: dict, want: dict, what: str, wrong: str = "data loss") -> None:
    """Final architecture / metrics / selection unlike the reference: `wrong` (a silently different model);
    only the bookkeeping (iter-N/result.json, history.jsonl) unlike it: bad error (a silent wrong record)."""
    keys = [k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    final = [describe_difference(got, want, k) for k in keys if k in FINAL_KEYS]
    other = [describe_difference(got, want, k) for k in keys if k not in FINAL_KEYS]
    row.require(not final, wrong, f"{what} to a final result unlike the reference: {'; '.join(final)}")
    if other:
        row.flag("bad error", f"{what} to the reference model, but bookkeeping differs: {'; '.join(other)}",
                 len(row.steps) - 1)  # fmt: skip


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


def rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def make_foreign(folder: Path, **files: str) -> Path:
    """A folder Tyr did not write: somebody's notes and thesis (plus `files`, name with '__' for '/')."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "sub" / "thesis.tex").write_text("\\documentclass{article}\n")
    for name, text in files.items():
        path = folder / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


# -- rows ---------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    input: str
    group: str = ""
    steps: list[Result] = field(default_factory=list)
    flags: list[tuple[str, str, int | None]] = field(default_factory=list)  # (verdict, why, step index)
    notes: list[str] = field(default_factory=list)
    safe: bool | None = None
    skipped: str | None = None
    seconds: float = 0.0

    # recording
    def flag(self, verdict: str, why: str, step: int | None = None) -> None:
        self.flags.append((verdict, why, step))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def require(self, condition: bool, verdict: str, why: str) -> bool:
        """A check on the state afterwards; `verdict` if it fails (data loss / security / bad error)."""
        if verdict in ("data loss", "security"):
            self.safe = bool(condition) if self.safe is None else (self.safe and bool(condition))
        if not condition:
            self.flag(verdict, why, len(self.steps) - 1 if self.steps else None)
        return bool(condition)

    def expect(
        self,
        res: Result,
        want: str | int = "error",
        needles: tuple[str, ...] = (),
        forbidden: tuple[str, ...] = (),
    ) -> Result:
        """Record `res` and judge it: want "error" (exit 2, one clean line), "success" (exit 0), "either"
        (exit 0, or a clean exit 2) or an exit code; `needles` must appear in the output, `forbidden` must not."""
        self.steps.append(res)
        i = len(self.steps) - 1
        if res.hung:
            self.flag("hang", f"no exit within {res.seconds:.0f} s", i)
            return res
        if res.traceback:
            self.flag("bad error", "traceback", i)
        if res.rc == 1:
            self.flag("bad error", f"exit 1: {res.last_line[:120]}", i)
        elif want == "error":
            if res.rc == 0:
                self.flag("bad error", "accepted silently (exit 0)", i)
            elif not res.clean_error:
                self.flag("bad error", f"exit {res.rc}, not one clean `tyr: error:` line{_shape(res)}", i)
        elif want == "success":
            if res.rc != 0:
                self.flag("bad error", f"exit {res.rc} where success is right: {res.last_line[:120]}", i)
        elif want == "either":
            if res.rc != 0 and not res.clean_error:
                self.flag(
                    "bad error", f"exit {res.rc}, neither success nor one clean error line{_shape(res)}", i
                )
        elif res.rc != want:
            self.flag("bad error", f"exit {res.rc}, expected {want}", i)
        for needle in needles:
            if needle.lower() not in res.text.lower():
                self.flag("bad error", f"message lacks {needle!r}", i)
        for bad in forbidden:
            if bad.lower() in res.text.lower():
                self.flag("bad error", f"message says {bad!r}", i)
        return res

    # reading
    @property
    def verdict(self) -> str:
        if self.skipped is not None:
            return "skipped"
        return max((f[0] for f in self.flags), key=VERDICTS.index, default="ok")

    @property
    def primary(self) -> Result | None:
        """The step the table shows: the first one behind the worst flag, else the first step."""
        worst = [f for f in self.flags if f[0] == self.verdict and f[2] is not None]
        if worst:
            return self.steps[worst[0][2]]
        return self.steps[0] if self.steps else None


def _shape(res: Result) -> str:
    """How an unclean error message looks: its line count and first error line."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    first = next((line for line in lines if ERROR_LINE.match(line.strip())), "")
    return f" ({len(lines)} lines, from {first[:80]!r})" if first else ""


@dataclass
class Spec:
    id: str
    input: str
    fn: Callable[[Row], None] | None = None
    skip: str | None = None


# -- shared set-up ------------------------------------------------------------------------------------------------


class Ctx:
    """The temp folder with the tiny model, the corpora, the reference run R and its export E."""

    def __init__(self, root: Path):
        from tests.tiny import save_tiny_checkpoint, write_corpus

        self.root = root
        self.tyr = Tyr(root)
        self.model = save_tiny_checkpoint(root / "assets" / "model")
        self.calib = Path(write_corpus(root / "assets" / "calib.txt", num_docs=40, seed=0))
        self.heldout = Path(write_corpus(root / "assets" / "heldout.txt", num_docs=10, seed=1))
        self.ref = root / "assets" / "R"
        t0 = time.perf_counter()
        res = self.tyr(*self.B(self.ref))
        if res.rc != 0:
            raise SystemExit(f"the reference run failed:\n{res.stderr}")
        self.run_seconds = time.perf_counter() - t0
        self.export = root / "assets" / "E"
        res = self.tyr("export", self.ref, "--out", self.export, "--quiet")
        if res.rc != 0:
            raise SystemExit(f"the reference export failed:\n{res.stderr}")
        self.ref_sig = signature(self.ref)
        self.ref_snapshot = snapshot(self.ref, ignore=(".lock",))
        self.export_snapshot = snapshot(self.export)
        self.model_snapshot = snapshot(self.model)
        self._random_ref: Path | None = None
        self._gpt2: Path | None = None
        self._lazy = threading.Lock()  # rows run on several threads

    def B(
        self, out: Path, *extra: object, model: object = None, data: object = None, eval_data: object = None
    ):
        """`tyr run $B --out OUT EXTRA...` (later flags override $B's)."""
        return [
            "run", "--model", model or self.model, "--data", data or self.calib,
            "--eval-data", eval_data or self.heldout, "--schedule", "smoke", "--sparsity", "0.5", "--quiet",
            "--out", out, *extra,
        ]  # fmt: skip

    def eval_args(self, target: object, *extra: object) -> list[object]:
        return [
            "eval",
            target,
            "--data",
            self.heldout,
            "--seq-len",
            "32",
            "--num-sequences",
            "2",
            "--quiet",
            *extra,
        ]

    def dir(self, row: Row) -> Path:
        """The row's own scratch folder (created)."""
        d = self.root / "rows" / row.id
        d.mkdir(parents=True, exist_ok=True)
        return d

    def copy_run(self, row: Row, name: str = "R", src: Path | None = None) -> Path:
        dst = self.dir(row) / name
        shutil.copytree(src or self.ref, dst, symlinks=True)
        return dst

    def copy_model(self, row: Row, name: str = "model") -> Path:
        dst = self.dir(row) / name
        shutil.copytree(self.model, dst)
        return dst

    def copy_export(self, row: Row, name: str = "E") -> Path:
        dst = self.dir(row) / name
        shutil.copytree(self.export, dst)
        return dst

    @property
    def random_ref(self) -> Path:
        """An uninterrupted `--method random` run (k07, k08)."""
        with self._lazy:
            return self._make_random_ref()

    def _make_random_ref(self) -> Path:
        if self._random_ref is None:
            out = self.root / "assets" / "R-random"
            res = self.tyr(*self.B(out, "--method", "random"))
            if res.rc != 0:
                raise RuntimeError(f"the random-method reference run failed: {res.last_line}")
            self._random_ref = out
        return self._random_ref

    @property
    def gpt2(self) -> Path:
        """A tiny GPT-2 checkpoint (an unsupported family, m05)."""
        with self._lazy:
            return self._make_gpt2()

    def _make_gpt2(self) -> Path:
        if self._gpt2 is None:
            from transformers import AutoModelForCausalLM, GPT2Config

            from tests.tiny import char_tokenizer

            folder = self.root / "assets" / "gpt2"
            config = GPT2Config(vocab_size=101, n_embd=48, n_layer=2, n_head=6, n_positions=128)
            AutoModelForCausalLM.from_config(config).save_pretrained(folder)
            char_tokenizer().save_pretrained(folder)
            self._gpt2 = folder
        return self._gpt2


def note_work(row: Row, out: Path) -> None:
    """Say what a refused command had already computed (resumable, but worth knowing)."""
    if row.steps and row.steps[-1].rc == 0:
        return
    if (out / "teacher").exists() or list(out.glob("iter-*")):
        done = ["teacher/"] if (out / "teacher").exists() else []
        done += sorted(p.name + "/" for p in out.glob("iter-*"))
        row.note(f"failed after computing {', '.join(done)}")


# -- config rows (c, s, y config files, b01) ----------------------------------------------------------------------


def config_rows(ctx: Ctx) -> list[Spec]:
    def refused(*extra: str, needles: tuple[str, ...] = (), want: str = "error") -> Callable[[Row], None]:
        def fn(row: Row) -> None:
            out = ctx.dir(row) / "run"
            row.expect(ctx.tyr(*ctx.B(out, *extra), timeout=RUN_TIMEOUT), want, needles)
            note_work(row, out)

        return fn

    def several(*variants: tuple[str, ...]) -> Callable[[Row], None]:
        def fn(row: Row) -> None:
            for k, extra in enumerate(variants):
                out = ctx.dir(row) / f"run{k}"
                row.expect(ctx.tyr(*ctx.B(out, *extra)), "error")
                note_work(row, out)

        return fn

    def c01(row: Row) -> None:
        row.expect(ctx.tyr(timeout=QUICK))

    def c02(row: Row) -> None:
        row.expect(ctx.tyr("run", "--model", ctx.model, timeout=QUICK))

    def config_file(content: bytes | None, *, directory: bool = False, drop: tuple[str, ...] = (),
                    needles: tuple[str, ...] = (), forbidden: tuple[str, ...] = ()) -> Callable[[Row], None]:  # fmt: skip
        def fn(row: Row) -> None:
            cfg = ctx.dir(row) / "cfg.yaml"
            if directory:
                cfg.mkdir()
            elif content is not None:
                cfg.write_bytes(content.replace(b"SENTINEL", str(ctx.dir(row) / "pwned").encode()))
            out = ctx.dir(row) / "run"
            args = ctx.B(out)
            for flag in drop:  # the file's value is the one under test: a flag would override it
                i = args.index(flag)
                del args[i : i + 2]
            row.expect(ctx.tyr(args[0], cfg, *args[1:], timeout=QUICK), "error", needles, forbidden)
            row.require(not (ctx.dir(row) / "pwned").exists(), "security", "the YAML payload ran")
            row.require(not (out / "teacher").exists(), "bad error", "work done before refusing the config")

        return fn

    laughs = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 13)
    )

    def b01(row: Row) -> None:
        out = ctx.dir(row) / "sn"
        args = ctx.B(out)
        args[0] = "build"
        row.expect(ctx.tyr(*args), "success")
        row.require(
            (out / "iter-1" / "supernet" / "manifest.json").is_file(), "bad error", "no supernet built"
        )

    return [
        Spec("c01", "`tyr` (no arguments)", c01),
        Spec("c02", "`tyr run --model M` (no --out)", c02),
        Spec("c03", "--sparsity 0", refused("--sparsity", "0", needles=("sparsity",))),
        Spec("c04", "--sparsity 1", refused("--sparsity", "1")),
        Spec("c05", "--sparsity -0.1", refused("--sparsity", "-0.1")),
        Spec("c06", "--sparsity abc", refused("--sparsity", "abc")),
        Spec("c07", "--sparsity nan", refused("--sparsity", "nan")),
        Spec("c08", "--sparsity inf", refused("--sparsity", "inf")),
        Spec("c09", "--sparsity 0.999", refused("--sparsity", "0.999", needles=("sparsity",))),
        Spec("s01", "--set search.bogus=1", refused("--set", "search.bogus=1")),
        Spec("s02", "--set data.seq_len=abc", refused("--set", "data.seq_len=abc")),
        Spec("s03", "--set data.seq_len (no '=')", refused("--set", "data.seq_len")),
        Spec("s04", "--set 'schedule=[1]'", refused("--set", "schedule=[1]")),
        Spec("s05", "--schedule bogus", refused("--schedule", "bogus")),
        Spec("s06", "--set 'search.stages=[]'", refused("--set", "search.stages=[]")),
        Spec("s07", "--set search.topk=100000", refused("--set", "search.topk=100000")),
        Spec("s08", "--set model.num_layers=0", refused("--set", "model.num_layers=0")),
        Spec("s09", "--dtype int8; --set model.dtype=int8", several(("--dtype", "int8"), ("--set", "model.dtype=int8"))),
        Spec("s10", "--set supernet.storage_dtype=garbage", refused("--set", "supernet.storage_dtype=garbage")),
        Spec("s11", "--device cuda:banana", refused("--device", "cuda:banana")),
        Spec("s12", "--set supernet.num_levels=999 (old: clamped, ran)", refused("--set", "supernet.num_levels=999", want="either")),
        Spec("s13", "--set sparsity.x=1", refused("--set", "sparsity.x=1")),
        Spec("s14", "--set model=foo", refused("--set", "model=foo")),
        Spec("s15", "--set search.generations=abc", refused("--set", "search.generations=abc")),
        Spec("s16", "owl_threshold=.nan, with and without --method owl", several(
            ("--method", "owl", "--set", "search.owl_threshold=.nan"), ("--set", "search.owl_threshold=.nan"))),
        Spec("s17", "--set search.max_level_distance=-1", refused("--set", "search.max_level_distance=-1")),
        Spec("s18", "supernet.attn_rounds=0; supernet.mlp_rounds=-3", several(
            ("--set", "supernet.attn_rounds=0"), ("--set", "supernet.mlp_rounds=-3"))),
        Spec("s19", "--set data.num_eval_sequences=-1", refused("--set", "data.num_eval_sequences=-1")),
        Spec("s20", "--seed -1", refused("--seed", "-1")),
        Spec("s21", "search.stages=[[0,64]]; [[1,0]]", several(
            ("--set", "search.stages=[[0,64]]"), ("--set", "search.stages=[[1,0]]"))),
        Spec("y01", "config.yaml with a syntax error", config_file(b"a: [1, 2\nb: 3\n")),
        Spec("y02", "config.yaml with an unknown top-level key", config_file(b"bogus_top: 1\n")),
        Spec("y03", 'config.yaml `sparsity: "half"`', config_file(b'sparsity: "half"\n', drop=("--sparsity",))),
        Spec("y04", "config.yaml holding a list", config_file(b"- 1\n- 2\n")),
        Spec("y05", "config.yaml `schedule: {a: 1}`", config_file(b"schedule: {a: 1}\n", drop=("--schedule",))),
        Spec("y06", "config.yaml `!!python/object/apply:os.system`", config_file(
            b'!!python/object/apply:os.system ["touch SENTINEL"]\n')),
        Spec("y07", "config.yaml with 12 nested alias levels (billion laughs)", config_file(laughs.encode())),
        Spec("y08", "config.yaml of random bytes", config_file(random.Random(8).randbytes(2048))),
        Spec("y09", "missing config file", config_file(None)),
        Spec("y10", "config path that is a directory", config_file(None, directory=True, forbidden=("does not exist",))),
        Spec("b01", "`tyr build $B` (with --schedule)", b01),
    ]  # fmt: skip


# -- model rows (m) -----------------------------------------------------------------------------------------------


def model_rows(ctx: Ctx) -> list[Spec]:
    def damaged(
        mutate: Callable[[Path], None] | None, needles: tuple[str, ...] = ()
    ) -> Callable[[Row], None]:
        def fn(row: Row) -> None:
            model = ctx.copy_model(row)
            if mutate is not None:
                mutate(model)
            before = snapshot(model)
            out = ctx.dir(row) / "run"
            row.expect(ctx.tyr(*ctx.B(out, model=model)), "error", needles)
            row.require(snapshot(model) == before, "data loss", "the model folder changed")
            row.require(
                not (out / "teacher").exists(), "bad error", "teacher computed before the model was refused"
            )

        return fn

    def truncate_config(m: Path) -> None:
        (m / "config.json").write_text((m / "config.json").read_text()[:40])

    def truncate_weights(m: Path) -> None:
        w = m / "model.safetensors"
        w.write_bytes(w.read_bytes()[: min(1 << 20, w.stat().st_size // 2)])

    def edit_config(**changes: object) -> Callable[[Path], None]:
        def mutate(m: Path) -> None:
            config = json.loads((m / "config.json").read_text())
            config.update(changes)
            (m / "config.json").write_text(json.dumps(config))

        return mutate

    def simple(model: Callable[[Row], object]) -> Callable[[Row], None]:
        def fn(row: Row) -> None:
            out = ctx.dir(row) / "run"
            row.expect(ctx.tyr(*ctx.B(out, model=model(row))), "error")
            row.require(
                not (out / "teacher").exists(), "bad error", "teacher computed before the model was refused"
            )

        return fn

    def empty(row: Row) -> Path:
        (ctx.dir(row) / "empty").mkdir(exist_ok=True)
        return ctx.dir(row) / "empty"

    class Payload:
        def __init__(self, sentinel: Path):
            self.sentinel = sentinel

        def __reduce__(self):
            return (os.system, (f"touch {self.sentinel}",))

    def m10(row: Row) -> None:
        model = ctx.copy_model(row)
        sentinel = ctx.dir(row) / "pwned"
        (model / "model.safetensors").unlink()
        (model / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(sentinel)))
        before = snapshot(model)
        row.expect(ctx.tyr(*ctx.B(ctx.dir(row) / "run", model=model)), "error")
        row.expect(ctx.tyr(*ctx.eval_args(model)), "error")
        row.require(not sentinel.exists(), "security", "the pickle payload ran")
        row.require(snapshot(model) == before, "data loss", "the model folder changed")

    return [
        Spec("m01", "--model /nonexistent/model", simple(lambda row: "/nonexistent/model")),
        Spec("m02", "model folder with truncated config.json", damaged(truncate_config)),
        Spec("m03", "model folder without model.safetensors", damaged(lambda m: (m / "model.safetensors").unlink())),
        Spec("m04", "model.safetensors truncated (to half)", damaged(truncate_weights)),
        Spec("m05", "tiny GPT-2 checkpoint (unsupported family)", simple(lambda row: ctx.gpt2)),
        Spec("m06", "empty model folder", simple(empty)),
        Spec("m07", "--model someorg/somemodel (offline)", simple(lambda row: "someorg/somemodel")),
        Spec("m08", "config.json hidden_size 96 vs 48-wide weights", damaged(edit_config(hidden_size=96))),
        Spec("m09", "config.json num_key_value_heads 3 (weights: 2)", damaged(edit_config(num_key_value_heads=3))),
        Spec("m10", "malicious pytorch_model.bin (pickle → os.system); run and eval", m10),
    ]  # fmt: skip


# -- data rows (d) ------------------------------------------------------------------------------------------------


def data_rows(ctx: Ctx) -> list[Spec]:
    def with_data(name: str, content: bytes | None, want: str = "error", *, folder: dict | None = None,
                  needles: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> Callable[[Row], None]:  # fmt: skip
        def fn(row: Row) -> None:
            d = ctx.dir(row)
            if folder is not None:
                (d / name).mkdir(parents=True, exist_ok=True)
                for file, data in folder.items():
                    (d / name / file).write_bytes(data)
            elif content is not None:
                (d / name).parent.mkdir(parents=True, exist_ok=True)
                (d / name).write_bytes(content)
            out = d / "run"
            row.expect(ctx.tyr(*ctx.B(out, *extra, data=name), cwd=d), want, needles)  # relative path, from d
            if want == "error":
                row.require(
                    not (out / "teacher").exists(),
                    "bad error",
                    "teacher computed before the data was refused",
                )
            else:
                row.require((out / "final" / "metrics.json").is_file(), "bad error", "no final metrics")

        return fn

    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "pruning",
        "heads",
        "and",
        "channels",
    ]
    rng = random.Random(9)
    one_line = (" ".join(rng.choice(words) for _ in range(400_000)) + "\n").encode()
    latin1 = ("Café, naïve résumé: a plain sentence of ordinary words. " * 3 + "\n").encode("latin-1") * 40
    jsonl = b"".join(json.dumps({"body": f"document {i} " * 20}).encode() + b"\n" for i in range(40))

    def d11(row: Row) -> None:
        d = ctx.dir(row)
        fresh = d / "fresh"
        row.expect(ctx.tyr(*ctx.B(fresh, eval_data="data/nope2.txt"), cwd=d), "error", needles=("nope2",))
        row.require(
            not (fresh / "teacher").exists(), "bad error", "missing eval data found only after the search"
        )
        # the corrected command: evaluation data is no longer run identity, so a finished run re-measures
        run = ctx.copy_run(row)
        res = row.expect(ctx.tyr(*ctx.B(run, eval_data=ctx.calib)), "success")
        if res.rc == 0:
            sig = signature(run)
            row.require(
                sig["final/architecture.json"] == ctx.ref_sig["final/architecture.json"],
                "bad error", "the architecture changed when only the evaluation data did",
            )  # fmt: skip
            metrics = json.loads(sig["final/metrics.json"])
            row.require(metrics.get("eval_data") == str(ctx.calib), "bad error", "metrics not re-measured")
            row.require("building the supernet" not in res.stderr, "bad error", "supernet rebuilt")
            row.note("corrected command on a finished run: exit 0, same architecture, metrics re-measured")

    return [
        Spec("d01", "--data empty.txt", with_data("empty.txt", b"")),
        Spec("d02", "--data binary.txt (20 KB random bytes)", with_data("binary.txt", random.Random(2).randbytes(20_000))),
        Spec("d03", "--data latin1.txt (ISO-8859-1 text) → should run", with_data("latin1.txt", latin1, "success")),
        Spec("d04", "--data dir/ holding only .csv/.bin", with_data("dir", None, folder={"a.csv": b"1,2\n", "b.bin": b"\0\1"})),
        Spec("d05", "--data tiny.txt (one line)", with_data("tiny.txt", b"hello world\n")),
        Spec("d06", "whitespace-only .txt", with_data("ws.txt", b"   \n\n\t  \n")),
        Spec("d07", "--data data/nope.txt (missing, relative)", with_data("data/nope.txt", None, needles=("does not exist",))),
        Spec("d08", "--data nope.txt (missing)", with_data("nope.txt", None, needles=("does not exist",))),
        Spec("d09", "--data one 3 MB line (400 k words) → should run", with_data("line.txt", one_line, "success")),
        Spec("d10", "--set data.seq_len=1024 (model max 128)", with_data("c.txt", ctx.calib.read_bytes(), extra=("--set", "data.seq_len=1024"))),
        Spec("d11", "--eval-data data/nope2.txt, then the corrected command", d11),
        Spec("d12", "--data nums.json ([1,2,3])", with_data("nums.json", b"[1, 2, 3]\n")),
        Spec("d13", ".jsonl without a `text` field", with_data("body.jsonl", jsonl, needles=("text_field",))),
        Spec("d14", "random bytes named .parquet", with_data("x.parquet", random.Random(14).randbytes(4096))),
        Spec("d15", "malformed .jsonl", with_data("bad.jsonl", b'{"text": "ok"}\n{"text": broken\n')),
    ]  # fmt: skip


# -- output-folder rows (o) ---------------------------------------------------------------------------------------


def output_rows(ctx: Ctx) -> list[Spec]:
    def refused_out(make: Callable[[Row], Path], *extra: str, forbidden: tuple[str, ...] = (),
                    needles: tuple[str, ...] = (), model: Callable[[Row, Path], object] | None = None,
                    ignore: tuple[str, ...] = ()) -> Callable[[Row], None]:  # fmt: skip
        def fn(row: Row) -> None:
            out = make(row)
            before = snapshot(out, ignore)
            m = model(row, out) if model is not None else None
            row.expect(ctx.tyr(*ctx.B(out, *extra, model=m)), "error", needles, forbidden)
            after = snapshot(out, ignore)
            row.require(after == before, "data loss", f"--out changed ({changes(before, after)})")

        return fn

    def a_file(row: Row) -> Path:
        (ctx.dir(row) / "file").write_text("precious\n")
        return ctx.dir(row) / "file"

    def foreign(**files: str) -> Callable[[Row], Path]:
        return lambda row: make_foreign(ctx.dir(row) / "foreign", **files)

    def the_model(row: Row, out: Path) -> Path:
        return out

    def o07(row: Row) -> None:
        for k, text in enumerate(("title: my thesis\n", "- a\n- b\n")):
            folder = make_foreign(
                ctx.dir(row) / f"foreign{k}", **{"config.yaml": text, "data.csv": "1,2,3\n"}
            )
            before = snapshot(folder)
            row.expect(ctx.tyr(*ctx.B(folder)), "error", forbidden=("holds a run with a different config",))
            row.require(snapshot(folder) == before, "data loss", "the foreign folder changed")

    def o03(row: Row) -> None:
        # No snapshot of the whole filesystem: a canary temp file under / (inside this row's folder) must survive
        # (the sweep of killed runs' `.*.tmp` files runs only in folders Tyr wrote) and no /.lock may stay.
        canary = ctx.dir(row) / ".canary.tmp"
        canary.write_text("another program's temp file\n")
        lock = Path("/.lock")
        had_lock = lock.exists()
        row.expect(ctx.tyr(*ctx.B(Path("/"))), "error")
        row.require(canary.is_file(), "data loss", "a `.*.tmp` file under / was deleted")
        row.require(lock.exists() == had_lock, "data loss", "/.lock was left behind")

    def o10(row: Row) -> None:
        target = ctx.copy_run(row, "target")
        link = ctx.dir(row) / "link"
        link.symlink_to(target, target_is_directory=True)
        res = row.expect(ctx.tyr(*ctx.B(link, "--force", "--method", "uniform")), "either")
        if res.rc == 0:
            row.note("a link to a Tyr run + --force: the run was replaced through the link")
            row.require(link.is_symlink(), "data loss", "the link itself was replaced")
        # a link to somebody's folder with --force must be refused and leave it as it was
        folder = make_foreign(ctx.dir(row) / "foreign")
        link2 = ctx.dir(row) / "link2"
        link2.symlink_to(folder, target_is_directory=True)
        before = snapshot(folder)
        row.expect(ctx.tyr(*ctx.B(link2, "--force")), "error")
        row.require(snapshot(folder) == before, "data loss", "the linked foreign folder changed")

    def o11(row: Row) -> None:
        run = ctx.copy_run(row)
        before = snapshot(run, (".lock",))
        row.expect(
            ctx.tyr(*ctx.B(run, "--force", "--sparsity", "0.25", model=ctx.dir(row) / "no-such-model")),
            "error",
        )
        after = snapshot(run, (".lock",))
        row.require(after == before, "data loss", f"the finished run changed ({changes(before, after)})")

    def o12(row: Row) -> None:
        d = ctx.dir(row) / "docs"
        d.mkdir()
        (d / "report.md").write_text("my own notes\n")
        before = snapshot(d)
        row.expect(ctx.tyr("report", ctx.ref, "--out", d, "--quiet"), "error")
        row.require(snapshot(d) == before, "data loss", "the user's report.md changed")

    def o13(row: Row) -> None:
        folder = make_foreign(ctx.dir(row) / "F")
        before = snapshot(folder)
        row.expect(ctx.tyr("export", ctx.ref, "--out", folder, "--force", "--quiet"), "error")
        row.require(snapshot(folder) == before, "data loss", "the foreign folder changed")

    unprivileged = (
        "needs an unprivileged user (this script runs as root, which ignores directory permissions)"
    )
    return [
        Spec("o01", "--out is an existing file", refused_out(a_file)),
        Spec("o02", "--out under a read-only directory", skip=unprivileged if os.geteuid() == 0 else "not automated"),
        Spec("o03", "--out / (without --force)", o03),
        Spec("o04", "--model D --out D (D = a model folder)", refused_out(lambda row: ctx.copy_model(row, "D"), model=the_model)),
        Spec("o05", "--model D --out D --force", refused_out(lambda row: ctx.copy_model(row, "D"), "--force", model=the_model)),
        Spec("o06", "non-empty foreign folder", refused_out(foreign())),
        Spec("o06+", "(added) foreign folder holding sub/.draft.tmp (another program's temp file)",
             refused_out(foreign(**{"sub__.draft.tmp": "half-saved work\n"}))),
        Spec("o07", "foreign folder with an unrelated config.yaml (and a list-valued one)", o07),
        Spec("o08", "foreign folder whose config.yaml is not valid YAML",
             refused_out(foreign(**{"config.yaml": "a: [1, 2\n"}))),
        Spec("o09", "o07 + --force", refused_out(foreign(**{"config.yaml": "title: my thesis\n", "data.csv": "1,2,3\n"}), "--force")),
        Spec("o10", "--out is a symlink (to a Tyr run; to a foreign folder), --force", o10),
        Spec("o11", "finished R, then `--model <typo> ... --out R --force`", o11),
        Spec("o12", "`tyr report R --out DIR`, DIR/report.md exists", o12),
        Spec("o13", "`tyr export R --out F --force`, F a foreign folder", o13),
    ]  # fmt: skip


# -- fault rows (f) -----------------------------------------------------------------------------------------------


def fault_rows(ctx: Ctx) -> list[Spec]:
    return [
        Spec("f01", "run on a 700 KiB tmpfs", skip="needs a tmpfs mount"),
        Spec("f02", "run on a 16 KiB tmpfs", skip="needs a tmpfs mount"),
        Spec(
            "f03",
            "search directory made read-only mid-run",
            skip="needs an unprivileged user (root ignores modes)",
        ),
    ]


# -- kill / resume rows (k) ---------------------------------------------------------------------------------------


def _phase(out: Path) -> str:
    from benchmarks.fault_injection import phase

    try:
        return phase(out)
    except Exception as e:  # a half-written folder the phase helper cannot read
        return f"unknown ({type(e).__name__})"


def kill_rows(ctx: Ctx) -> list[Spec]:
    def exists(out: Path, pattern: str) -> Callable[[], bool]:
        return lambda: any(out.glob(pattern))

    def resume_identical(row: Row, out: Path, args: list[object], want: dict) -> None:
        res = row.expect(ctx.tyr(*args), "success")
        if res.rc == 0:
            compare(row, signature(out), want, "resumed")
        left = leftovers(out)
        row.require(not left, "bad error", f"temp files left behind: {', '.join(left[:3])}")

    def killed_then_resumed(*events: tuple[str, str | float], sig: int = signal.SIGKILL, want_rc: int | None = None,
                            extra: tuple[str, ...] = (), reference: Callable[[], Path] | None = None,
                            ) -> Callable[[Row], None]:  # fmt: skip
        """For each (label, glob pattern or delay in s): a fresh run, `sig` when the pattern first matches
        under RUN (or after the delay), then the same command; the result must equal the reference."""

        def fn(row: Row) -> None:
            want = signature(reference()) if reference is not None else ctx.ref_sig
            for k, (label, when) in enumerate(events):
                out = ctx.dir(row) / f"run{k}"
                args = ctx.B(out, *extra)
                if isinstance(when, str):
                    event = exists(out, when)
                else:
                    start = time.monotonic()
                    event = lambda start=start, when=when: time.monotonic() - start >= when  # noqa: E731
                res, fired = ctx.tyr.signal_when(args, event, sig)
                where = _phase(out)
                row.note(
                    f"{label}: " + (f"signal sent ({where}), exit {res.rc}" if fired else "finished first")
                )
                if fired and want_rc is not None:
                    row.expect(res, want_rc, needles=("re-run the same command to resume",))
                resume_identical(row, out, args, want)
                if "Forcibly releasing the lock file" in row.steps[-1].stderr:
                    row.note(f"resume waited {row.steps[-1].seconds:.0f} s for Optuna's stale journal lock "
                             "(left by the killed process), with an Optuna warning line")  # fmt: skip

        return fn

    def k04(row: Row) -> None:
        out = ctx.dir(row) / "run"
        args = ctx.B(out)
        res, fired = ctx.tyr.signal_when(args, exists(out, "iter-1/supernet/0"))
        row.note(
            f"SIGKILL when iter-1/supernet/0 appeared: {'sent' if fired else 'finished first'} ({_phase(out)})"
        )
        resume_identical(row, out, args, ctx.ref_sig)

    def k08(row: Row) -> None:
        out = ctx.copy_run(row, src=ctx.random_ref)
        shutil.rmtree(out / "final")
        (out / "iter-2" / "result.json").unlink()
        with open(out / "iter-2" / "search" / "optuna.journal", "ab") as f:
            f.write(b'{"op_code":4,"worker_id":"ab')
        resume_identical(row, out, ctx.B(out, "--method", "random"), signature(ctx.random_ref))

    def k09(row: Row) -> None:
        out = ctx.dir(row) / "run"
        a = ctx.tyr.popen(*ctx.B(out))
        b = ctx.tyr.popen(*ctx.B(out))
        results = [ctx.tyr.wait(*a), ctx.tyr.wait(*b)]
        codes = sorted(r.rc if r.rc is not None else -1 for r in results)
        for r in results:
            row.expect(r, "either")
        row.require(0 in codes, "bad error", "neither run finished")
        refused = [r for r in results if r.rc == 2]
        for r in refused:
            row.require(
                "in use by another Tyr process" in r.stderr,
                "bad error",
                "refusal does not name the other process",
            )
            row.require("--force" not in r.last_line, "bad error", "refusal suggests --force on a live run")
        compare(row, signature(out), ctx.ref_sig, "finished")

    def k10(row: Row) -> None:
        out = ctx.dir(row) / "run"
        first = ctx.tyr.popen(*ctx.B(out))
        deadline = time.monotonic() + RUN_TIMEOUT
        while first[0].poll() is None and not (out / "iter-1" / "search" / "state.json").exists():
            if time.monotonic() > deadline:
                break
            time.sleep(0.002)
        started_mid_search = first[0].poll() is None
        second = row.expect(ctx.tyr(*ctx.B(out)), "error" if started_mid_search else "either",
                            needles=("in use by another Tyr process",) if started_mid_search else ())  # fmt: skip
        row.expect(ctx.tyr.wait(*first), "success")
        row.note(
            f"second command started {'mid-search' if started_mid_search else 'after the first finished'}: exit {second.rc}"
        )
        compare(row, signature(out), ctx.ref_sig, "finished")

    def k11(row: Row) -> None:
        run = ctx.copy_run(row)
        before = snapshot(run, (".lock",))
        row.expect(ctx.tyr(*ctx.B(run, "--sparsity", "0.25")), "error", needles=("sparsity",))
        row.require(snapshot(run, (".lock",)) == before, "data loss", "the run changed")

    return [
        Spec("k01", "SIGKILL after the teacher / mid iteration-1 search, then the same command",
             killed_then_resumed(("teacher written", "teacher/targets.safetensors"),
                                 ("iteration-1 search", "iter-1/search/state.json"))),
        Spec("k02", "SIGKILL on events: iteration-2 supernet started; final/architecture.json written",
             killed_then_resumed(("iteration-2 supernet", "iter-2/supernet/*"),
                                 ("final/architecture.json written", "final/architecture.json"))),
        Spec("k03", "SIGKILL while the teacher targets stream (a teacher temp file exists)",
             killed_then_resumed(("teacher temp file", "teacher/.*.tmp"))),
        Spec("k04", "SIGKILL while gene 0 of iteration 1 is written", k04),
        Spec("k05", "SIGINT (Ctrl-C) during the search", killed_then_resumed(
            ("SIGINT mid-search", "iter-1/search/state.json"), sig=signal.SIGINT, want_rc=130)),
        Spec("k06", "SIGTERM during the teacher", killed_then_resumed(
            ("SIGTERM in the teacher", "teacher"), sig=signal.SIGTERM, want_rc=143)),
        Spec("k07", "--method random, SIGKILL mid-search (Optuna journal)", killed_then_resumed(
            ("random search started (journal written)", "iter-1/search/optuna.journal"), extra=("--method", "random"),
            reference=lambda: ctx.random_ref)),
        Spec("k08", "torn last line appended to iter-2/search/optuna.journal", k08),
        Spec("k09", "two identical `tyr run` on one R started together", k09),
        Spec("k10", "second identical `tyr run` started while the first is mid-search", k10),
        Spec("k11", "same R, different config (--sparsity 0.25)", k11),
    ]  # fmt: skip


# -- resume / corruption rows (r) ---------------------------------------------------------------------------------


_PATH = re.compile(r"(/[^\s;,'\"()]+)")


def _advised_deletion(message: str, out: Path) -> Path | None:
    """The file or folder inside `out` that an error message tells the user to delete, if any: the path right
    after "delete", else (for "delete it" / "delete the folder") the first path the message names."""
    lower = message.lower()
    if "delete" not in lower:
        return None
    resolved = out.resolve()
    after = _PATH.match(message[lower.index("delete") + len("delete") :].lstrip())
    candidates = ([after.group(1)] if after else []) + _PATH.findall(message)
    for raw in candidates:
        p = Path(raw.rstrip(".:"))
        try:
            p.resolve().relative_to(resolved)
        except ValueError:
            continue
        if p.resolve() == resolved:
            continue
        if "delete the folder" in message.lower() and p.is_file():
            return p.parent
        return p
    return None


def resume_rows(ctx: Ctx) -> list[Spec]:
    def recover(row: Row, out: Path, *, wrong: str = "bad error", by_hand: str | None = None) -> None:
        """Re-run the same command; a refusal is followed as advised ("delete X", "--force", "re-run") up to
        twice. ok: it ends with the reference result. `by_hand`: when stuck, what a user would try next
        (delete that path) -- recorded as a note only."""
        args = ctx.B(out)
        res = row.expect(ctx.tyr(*args), "either")
        for _ in range(2):
            if res.rc != 2:
                break
            target = _advised_deletion(res.last_line, out)
            if target is not None:
                row.note(f"followed the advice: deleted {target.relative_to(out)}")
                rmtree(target)
                res = row.expect(ctx.tyr(*args), "either")
            elif "--force" in res.last_line:
                row.note("followed the advice: --force")
                res = row.expect(ctx.tyr(*args, "--force"), "either")
            elif "re-run" in res.last_line:
                row.note("followed the advice: re-ran")
                res = row.expect(ctx.tyr(*args), "either")
            else:
                break
        if res.rc == 0:
            compare(row, signature(out), ctx.ref_sig, "finished", wrong)
        elif res.rc == 2:
            row.flag(
                "bad error",
                "run stuck: the message gives no advice that finishes the run",
                len(row.steps) - 1,
            )
            if by_hand is not None:
                rmtree(out / by_hand)
                again = ctx.tyr(*args)
                same = again.rc == 0 and signature(out) == ctx.ref_sig
                row.note(
                    f"deleting {by_hand}/ by hand and re-running: exit {again.rc}"
                    + (", reference result" if same else "")
                )

    def damaged(mutate: Callable[[Path], None], **kw) -> Callable[[Row], None]:
        def fn(row: Row) -> None:
            out = ctx.copy_run(row)
            mutate(out)
            recover(row, out, **kw)

        return fn

    def unfinish(out: Path, iteration: int = 2) -> None:
        rmtree(out / "final")
        rmtree(out / f"iter-{iteration}" / "result.json")

    def r01(out: Path) -> None:
        unfinish(out)
        state = out / "iter-2" / "search" / "state.json"
        state.write_bytes(state.read_bytes()[:50])

    def r02(out: Path) -> None:
        unfinish(out)
        history = out / "iter-2" / "search" / "history.jsonl"
        lines = history.read_text().splitlines(keepends=True)
        history.write_text("".join([lines[0], "garbage{\n", *lines[1:]]))

    def r03(out: Path) -> None:
        rmtree(out / "final")
        manifest = out / "iter-2" / "supernet" / "manifest.json"
        manifest.write_bytes(manifest.read_bytes()[:200])

    def r04(out: Path) -> None:
        rmtree(out / "final")
        variant = out / "iter-1" / "supernet" / "0" / "attn" / "+0.safetensors"
        data = bytearray(variant.read_bytes())
        data[-16:] = b"\x11" * 16
        variant.write_bytes(bytes(data))

    def r05(out: Path) -> None:
        rmtree(out / "final")
        selection = json.loads((ctx.ref / "final" / "selection.json").read_text())
        manifest = json.loads((out / "iter-2" / "supernet" / "manifest.json").read_text())
        level = manifest["genes"]["0.attn"]["levels"][str(selection["genome"][0])]
        (out / "iter-2" / "supernet" / level["file"]).unlink()

    def teacher_region(out: Path, name: str) -> tuple[Path, int, int]:
        targets = out / "teacher" / "targets.safetensors"
        data = targets.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        start, end = json.loads(data[8 : 8 + n])[name]["data_offsets"]
        return targets, 8 + n + start, 8 + n + end

    def r06(out: Path) -> None:
        unfinish(out)
        targets, start, _ = teacher_region(out, "indices")
        data = bytearray(targets.read_bytes())
        data[start : start + 64] = b"\x7f" * 64
        targets.write_bytes(bytes(data))

    def r07(out: Path) -> None:
        unfinish(out)
        targets, start, end = teacher_region(out, "values")
        data = bytearray(targets.read_bytes())
        data[start:end] = b"\x00\x3c" * ((end - start) // 2)  # fp16 1.0 everywhere: valid numbers
        targets.write_bytes(bytes(data))

    def r08(out: Path) -> None:
        unfinish(out)
        meta = out / "teacher" / "meta.json"
        meta.write_bytes(meta.read_bytes()[:30])

    def r09(out: Path) -> None:
        rmtree(out / "final")
        (out / "iter-2" / "result.json").write_text("garbage")

    def r10(out: Path) -> None:
        rmtree(out / "final")
        result = out / "iter-2" / "result.json"
        data = json.loads(result.read_text())
        data["genome"] = data["genome"][:3]
        result.write_text(json.dumps(data))

    def r11(out: Path) -> None:
        metrics = out / "final" / "metrics.json"
        metrics.write_bytes(metrics.read_bytes()[:40])

    def r12(row: Row) -> None:
        from safetensors.torch import load_file, save_file

        model = ctx.copy_model(row)
        out = ctx.dir(row) / "run"
        args = ctx.B(out, model=model)
        row.expect(ctx.tyr(*args), "success")
        weights = load_file(model / "model.safetensors")
        name = next(n for n in weights if n.endswith("down_proj.weight"))
        weights[name] = weights[name] * 1.01
        save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
        exported = row.expect(ctx.tyr("export", out, "--out", ctx.dir(row) / "E"), "either")
        if exported.rc == 0:
            warnings = [
                line.lower() for line in exported.stderr.splitlines() if line.startswith("[tyr] warning")
            ]
            warned = any(w in line for line in warnings for w in ("weights", "sha256", "changed"))
            row.require(warned, "data loss", "export of the old supernet on changed base weights, no warning")
            if warned:
                row.note("export went ahead with a warning about the changed weights")
        rmtree(out / "final")
        rmtree(out / "iter-2" / "search")
        res = row.expect(ctx.tyr(*args), "error", needles=("model_weights_sha256",))
        row.require(res.rc != 0, "data loss", "resumed with the old supernet and teacher on the new weights")

    return [
        Spec("r01", "iter-2 state.json truncated to 50 bytes, result.json and final/ removed", damaged(r01)),
        Spec("r02", "garbage line inserted in iter-2 history.jsonl, result.json and final/ removed", damaged(r02)),
        Spec("r03", "iter-2 manifest.json truncated (finished iteration), final/ removed", damaged(r03)),
        Spec("r04", "bytes overwritten in a finished iteration-1 variant file, final/ removed", damaged(r04)),
        Spec("r05", "a selected variant file of finished iteration 2 deleted, final/ removed", damaged(r05)),
        Spec("r06", "teacher targets: index region overwritten (iter-2 to redo)", damaged(r06)),
        Spec("r07", "teacher targets: values overwritten with valid fp16 (iter-2 to redo)",
             damaged(r07, wrong="data loss")),
        Spec("r08", "teacher meta.json truncated (iter-2 to redo)", damaged(r08, by_hand="teacher")),
        Spec("r09", "iter-2/result.json = `garbage`, final/ removed", damaged(r09)),
        Spec("r10", "iter-2/result.json genome cut to 3 genes, final/ removed", damaged(r10)),
        Spec("r11", "final/metrics.json truncated on a finished run", damaged(r11)),
        Spec("r12", "base weights perturbed in place after a finished run; export, then resume", r12),
    ]  # fmt: skip


# -- security rows (h) --------------------------------------------------------------------------------------------


def security_rows(ctx: Ctx) -> list[Spec]:
    def manifest_entry(point: Callable[[Path, Path], tuple[str, str | None]], timeout: float = QUICK):
        """Point the selected gene-0 attention variant of R's copy at `point(run, supernet_dir)` -> (file, sha)."""

        def fn(row: Row) -> None:
            run = ctx.copy_run(row)
            selection = json.loads((run / "final" / "selection.json").read_text())
            supernet = run / f"iter-{selection['iteration']}" / "supernet"
            path = supernet / "manifest.json"
            manifest = json.loads(path.read_text())
            level = manifest["genes"]["0.attn"]["levels"][str(selection["genome"][0])]
            level["file"], sha = point(run, supernet)
            if sha is not None:
                level["sha256"] = sha
            path.write_text(json.dumps(manifest))
            export = ctx.dir(row) / "export"
            row.expect(ctx.tyr("export", run, "--out", export, "--quiet", timeout=timeout), "error")
            row.require(not export.exists(), "security", "an export was written from a file outside the run")

        return fn

    def passwd(run: Path, supernet: Path) -> tuple[str, str | None]:
        return "../../../../../../../../../../etc/passwd", hashlib.sha256(
            Path("/etc/passwd").read_bytes()
        ).hexdigest()

    def outside(run: Path, supernet: Path) -> tuple[str, str | None]:
        src = next(supernet.glob("0/attn/*.safetensors"))
        dst = run.parent / "outside.safetensors"
        shutil.copy(src, dst)
        return str(dst), hashlib.sha256(dst.read_bytes()).hexdigest()

    def fifo(run: Path, supernet: Path) -> tuple[str, str | None]:
        os.mkfifo(supernet / "pipe")
        return "pipe", None

    def h04(row: Row) -> None:
        for k, files in enumerate(({"architecture.json": '{"mine": true}'}, {"metrics.json": "{}"})):
            run = ctx.copy_run(row, f"R{k}")
            folder = ctx.dir(row) / f"outside{k}"
            folder.mkdir()
            for name, text in files.items():
                (folder / name).write_text(text)
            rmtree(run / "final")
            (run / "final").symlink_to(folder, target_is_directory=True)
            before = snapshot(folder)
            row.expect(ctx.tyr(*ctx.B(run)), "error")
            after = snapshot(folder)
            row.require(after == before, "security", f"the outside folder changed ({changes(before, after)})")

    def h05(row: Row) -> None:
        run = ctx.copy_run(row)
        folder = ctx.dir(row) / "outside"
        folder.mkdir()
        (folder / "allocation.png").write_bytes(b"my own picture")
        (run / "plots").symlink_to(folder, target_is_directory=True)
        before = snapshot(folder)
        row.expect(ctx.tyr("report", run, "--quiet"), "either")
        after = snapshot(folder)
        row.require(after == before, "security", f"the outside folder changed ({changes(before, after)})")

    def payload_export(row: Row) -> tuple[Path, Path]:
        export = ctx.copy_export(row)
        sentinel = ctx.dir(row) / "pwned"
        modeling = export / "modeling_tyr.py"
        modeling.write_text(
            f"import pathlib\npathlib.Path({str(sentinel)!r}).touch()\n" + modeling.read_text()
        )
        return export, sentinel

    def h06(row: Row) -> None:
        export, sentinel = payload_export(row)
        tok = json.loads((export / "tokenizer_config.json").read_text())
        tok["auto_map"] = {"AutoTokenizer": ["modeling_tyr.TyrLlamaConfig", None]}
        (export / "tokenizer_config.json").write_text(json.dumps(tok))
        row.expect(ctx.tyr(*ctx.eval_args(export)), "either")
        row.require(not sentinel.exists(), "security", "the modeling file payload ran")

    def h07(row: Row) -> None:
        export, sentinel = payload_export(row)
        config = json.loads((export / "config.json").read_text())
        config["model_type"] = "evilmodel"
        (export / "config.json").write_text(json.dumps(config))
        row.expect(ctx.tyr(*ctx.eval_args(export)), "error")
        row.require(not sentinel.exists(), "security", "the modeling file payload ran")

    def h08(row: Row) -> None:
        export = ctx.copy_export(row)
        config = json.loads((export / "config.json").read_text())
        key = next(k for k in config if k.endswith("_per_layer"))
        config[key] = config[key][:-1]
        (export / "config.json").write_text(json.dumps(config))
        row.expect(ctx.tyr(*ctx.eval_args(export)), "error")

    return [
        Spec("h01", "manifest `file: ../../…/etc/passwd` (+ its sha256); `tyr export`", manifest_entry(passwd)),
        Spec("h02", "manifest `file:` absolute path to an outside .safetensors (+ sha256); export", manifest_entry(outside)),
        Spec("h03", "manifest `file:` = a FIFO; `tyr export` (timeout 60 s)", manifest_entry(fifo)),
        Spec("h04", "RUN/final → outside folder (holding architecture.json; metrics.json); resume", h04),
        Spec("h05", "RUN/plots → outside folder holding allocation.png; `tyr report RUN`", h05),
        Spec("h06", "export with a payload modeling_tyr.py + tokenizer auto_map → it; `tyr eval`", h06),
        Spec("h07", "export with model_type `evilmodel` + auto_map; `tyr eval`", h07),
        Spec("h08", "export config.json per-layer list one layer short; `tyr eval`", h08),
    ]  # fmt: skip


# -- eval / export rows (v, x) ------------------------------------------------------------------------------------


def eval_export_rows(ctx: Ctx) -> list[Spec]:
    def eval_refused(*extra: object, target: Callable[[], object] | None = None) -> Callable[[Row], None]:
        def fn(row: Row) -> None:
            row.expect(ctx.tyr(*ctx.eval_args(target() if target else ctx.export, *extra)), "error")

        return fn

    def v04(row: Row) -> None:
        row.expect(ctx.tyr(*ctx.eval_args("/nonexistent/x")), "error")
        row.expect(ctx.tyr(*ctx.eval_args(ctx.export, "--seq-len", "100000")), "error")

    def x01(row: Row) -> None:
        run = ctx.copy_run(row)
        for name in ("final", "iter-2/result.json", "iter-1/result.json"):
            rmtree(run / name)
        row.expect(ctx.tyr("export", run, "--out", ctx.dir(row) / "e1", "--quiet"), "error")
        folder = make_foreign(ctx.dir(row) / "notarun")
        row.expect(ctx.tyr("export", folder, "--out", ctx.dir(row) / "e2", "--quiet"), "error")

    def x02(row: Row) -> None:
        parent = ctx.dir(row) / "P"
        parent.mkdir()
        run = ctx.copy_run(row, "P/R")
        model = ctx.copy_model(row)
        guarded = {"P": parent, "model": model}
        before = {k: snapshot(v, (".lock",)) for k, v in guarded.items()}
        for out in (run / "final", model, parent):
            row.expect(ctx.tyr("export", run, "--out", out, "--force", "--quiet"), "error")
        for k, v in guarded.items():
            after = snapshot(v, (".lock",))
            row.require(after == before[k], "data loss", f"{k} changed ({changes(before[k], after)})")

    return [
        Spec("v01", "`tyr eval E --batch-size 0`", eval_refused("--batch-size", "0")),
        Spec("v02", "`tyr eval E --topk -5`", eval_refused("--topk", "-5")),
        Spec("v03", "`tyr eval E --num-sequences -1`", eval_refused("--num-sequences", "-1")),
        Spec("v04", "`tyr eval /nonexistent/x`; `--seq-len 100000`", v04),
        Spec("x01", "`tyr export` on an unfinished run / a non-run folder", x01),
        Spec("x02", "export --force to R/final, to the base model, to R's parent", x02),
    ]


# -- status / report rows (t) -------------------------------------------------------------------------------------


def status_rows(ctx: Ctx) -> list[Spec]:
    def malformed(mutate: Callable[[Path], None], report: bool = True) -> Callable[[Row], None]:
        def fn(row: Row) -> None:
            run = ctx.copy_run(row)
            mutate(run)
            commands = [("status", run), ("status", "--json", run)] + (
                [("report", run, "--quiet")] if report else []
            )
            for argv in commands:
                row.expect(ctx.tyr(*argv, timeout=QUICK), "either")

        return fn

    def yaml_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
        import yaml

        def mutate(run: Path) -> None:
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            change(cfg)
            (run / "config.yaml").write_text(yaml.safe_dump(cfg))

        return mutate

    def metrics(run: Path) -> None:
        (run / "final" / "metrics.json").write_text(json.dumps({"dense": 5, "achieved_sparsity": "x"}))

    def state_and_history(run: Path) -> None:
        rmtree(run / "final" / "metrics.json")
        rmtree(run / "iter-2" / "result.json")
        state = json.loads((run / "iter-2" / "search" / "state.json").read_text())
        state["parent_fitness"] = "abc"
        (run / "iter-2" / "search" / "state.json").write_text(json.dumps(state))
        (run / "iter-1" / "search" / "history.jsonl").write_text(
            '{"generation": 1, "seconds": "x", "fitness": 0.5}\n'
        )

    def t05(row: Row) -> None:
        row.expect(ctx.tyr("status", "/nonexistent/run", timeout=QUICK), "error")

    return [
        Spec("t01", "`tyr status` / report, config.yaml `search: [1,2]`",
             malformed(yaml_edit(lambda c: c.__setitem__("search", [1, 2])))),
        Spec("t02", "`tyr status` / report, config `generations: abc`",
             malformed(yaml_edit(lambda c: c["search"].__setitem__("generations", "abc")))),
        Spec("t03", 'status / report, final/metrics.json {"dense": 5, "achieved_sparsity": "x"}', malformed(metrics)),
        Spec("t04", 'status / report, state.json parent_fitness "abc" + history seconds "x"', malformed(state_and_history)),
        Spec("t05", "`tyr status /nonexistent/run`", t05),
    ]  # fmt: skip


# -- ray rows (y-r) -----------------------------------------------------------------------------------------------


def ray_rows(ctx: Ctx) -> list[Spec]:
    def refused(*variants: tuple[str, ...], needles: tuple[str, ...] = ()) -> Callable[[Row], None]:
        def fn(row: Row) -> None:
            for k, extra in enumerate(variants):
                out = ctx.dir(row) / f"run{k}"
                row.expect(ctx.tyr(*ctx.B(out, *extra), timeout=QUICK), "error", needles)
                row.require(
                    not (out / "teacher").exists(), "bad error", "a syntax error found only after the teacher"
                )

        return fn

    cluster = "needs a Ray cluster / starts Ray (only the address-syntax and --workers rows are replayed)"
    return [
        Spec("y-r1", "--workers 0 / --workers -1", refused(("--workers", "0"), ("--workers", "-1"))),
        Spec("y-r2", "--ray-address 'not an address!!'", refused(("--ray-address", "not an address!!"))),
        Spec("y-r3", "--ray-address 127.0.0.1:1 (closed)", skip=cluster),
        Spec("y-r4", "--ray-address auto (no cluster)", skip=cluster),
        Spec("y-r5", "--ray-address 'ray://[::1'", refused(("--ray-address", "ray://[::1"))),
        Spec("y-r6", "--workers 1, the worker actor SIGKILLed mid-search", skip=cluster),
        Spec("y-r7", "--workers 1, the driver SIGKILLed mid-search", skip=cluster),
    ]  # fmt: skip


GROUPS = {
    "config": config_rows,
    "model": model_rows,
    "data": data_rows,
    "output": output_rows,
    "fault": fault_rows,
    "kill": kill_rows,
    "resume": resume_rows,
    "security": security_rows,
    "eval/export": eval_export_rows,
    "status": status_rows,
    "ray": ray_rows,
}


# -- driver -------------------------------------------------------------------------------------------------------


def checklist_ids() -> list[str]:
    return list(CHECKLIST_IDS)


def selected(spec_id: str, only: list[str] | None) -> bool:
    return only is None or any(spec_id == o or spec_id.startswith(o) for o in only)


def run_row(ctx: Ctx, group: str, spec: Spec) -> Row:
    row = Row(spec.id, spec.input, group)
    if spec.skip is not None:
        row.skipped = spec.skip
        return row
    t0 = time.perf_counter()
    try:
        spec.fn(row)
    except Exception as e:  # a bug in this script, not in Tyr: say so and go on
        row.skipped = f"script error: {type(e).__name__}: {e}"
    row.seconds = time.perf_counter() - t0
    return row


def shown(text: str, root: Path) -> str:
    return text.replace(str(root), "$T")


def reproduce(res: Result | None, root: Path) -> str:
    if res is None:
        return ""
    return shown(shlex.join(["tyr", *res.argv[3:]]), root)


def cell(text: str, limit: int | None = None) -> str:
    text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def table(rows: list[Row], root: Path) -> str:
    lines = ["| id | input | exit | last line | traceback | verdict |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row.skipped is not None:
            lines.append(f"| {row.id} | {cell(row.input, 70)} | – | {cell(row.skipped, 100)} | – | skipped |")
            continue
        exits = ", ".join("timeout" if s.rc is None else str(s.rc) for s in row.steps) or "–"
        p = row.primary
        last = cell(shown(p.last_line, root), 100) if p is not None else ""
        tb = "yes" if any(s.traceback for s in row.steps) else "no"
        lines.append(f"| {row.id} | {cell(row.input, 70)} | {exits} | {last} | {tb} | {row.verdict} |")
    return "\n".join(lines)


def row_json(row: Row, root: Path) -> dict:
    return {
        "id": row.id,
        "group": row.group,
        "input": row.input,
        "verdict": row.verdict,
        "skipped": row.skipped,
        "state_safe": row.safe,
        "why": [shown(f"{v}: {why}", root) for v, why, _ in row.flags],
        "notes": [shown(n, root) for n in row.notes],
        "seconds": round(row.seconds, 2),
        "reproduce": reproduce(row.primary, root) if row.verdict not in ("ok", "skipped") else None,
        "steps": [
            {
                "command": reproduce(s, root),
                "exit": s.rc,
                "last_line": shown(s.last_line, root),
                "traceback": s.traceback,
                "seconds": round(s.seconds, 2),
            }
            for s in row.steps
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated row ids or id prefixes (default: every row)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    parser.add_argument("--jobs", type=int, default=2, help="rows run at the same time (default 2)")
    args = parser.parse_args()
    only = [o.strip() for o in args.only.split(",")] if args.only else None
    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="tyr-bad-inputs-"))
    try:
        print(
            f"[bad_inputs] setting up in {root}: tiny model, corpora, reference run R, export E",
            file=sys.stderr,
        )
        ctx = Ctx(root)
        print(f"[bad_inputs] reference run: {ctx.run_seconds:.1f} s", file=sys.stderr)
        specs = [(g, spec) for g, make in GROUPS.items() for spec in make(ctx) if selected(spec.id, only)]
        done: dict[int, Row] = {}
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each row has its own folders: independent
            futures = {pool.submit(run_row, ctx, g, spec): i for i, (g, spec) in enumerate(specs)}
            for future in as_completed(futures):
                row = done[futures[future]] = future.result()
                print(f"[bad_inputs] {row.id:5s} {row.verdict:9s} {row.seconds:5.1f} s", file=sys.stderr)
        rows = [done[i] for i in range(len(specs))]
        untouched = (
            snapshot(ctx.ref, (".lock",)) == ctx.ref_snapshot and snapshot(ctx.export) == ctx.export_snapshot
        )
        untouched = untouched and snapshot(ctx.model) == ctx.model_snapshot
        elapsed = time.perf_counter() - t_start

        known = checklist_ids()
        listed = [r for r in rows if r.id in known] if known else rows
        added = [r for r in rows if known and r.id not in known]
        counts = {v: sum(r.verdict == v for r in listed) for v in (*VERDICTS, "skipped")}
        tried = len(listed) - counts["skipped"]
        missing = [i for i in known if i not in {r.id for r in rows}] if only is None else []
        summary = (
            f"tried {tried}, ok {counts['ok']}, bad error {counts['bad error']}, data loss {counts['data loss']}, "
            f"security {counts['security']}, hang {counts['hang']}, skipped {counts['skipped']} "
            f"(of the checklist's {len(known)} rows) in {elapsed:.0f} s"
        )
        print(table(rows, root))
        print()
        print(summary)
        if added:
            print("rows added beyond the checklist: " + ", ".join(f"{r.id} {r.verdict}" for r in added))
        if missing:
            print(f"checklist rows not covered: {', '.join(missing)}")
        if not untouched:
            print("WARNING: the shared reference run, export or model changed during the rows")
        problems = [r for r in rows if r.verdict not in ("ok", "skipped")]
        if problems:
            print("\nRows that are not ok:")
            for r in problems:
                why = "; ".join(shown(w, root) for v, w, _ in r.flags if v == r.verdict)
                print(f"- {r.id} ({r.verdict}): {why}\n    {reproduce(r.primary, root)}")
        payload = {
            "checklist": "131 rows tried at commit 699d6f1",
            "summary": {"tried": tried, **counts, "checklist_rows": len(known), "seconds": round(elapsed, 1)},
            "added_rows": {r.id: r.verdict for r in added},
            "jobs": args.jobs,
            "only": only,
            "reference_run_seconds": round(ctx.run_seconds, 1),
            "shared_assets_untouched": untouched,
            "temp_folder": "$T",
            "rows": [row_json(r, root) for r in rows],
        }
        path = write_results("bad_inputs", payload)
        print(f"\nwrote {path}", file=sys.stderr)
    finally:
        if args.keep:
            print(f"[bad_inputs] kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
