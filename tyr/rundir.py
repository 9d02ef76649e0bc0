"""The run directory: the one place that knows its layout, reads its files and says whether Tyr wrote it.

```
RUN/.tyr-run                        marker: this folder was written by Tyr (format, Tyr version)
RUN/config.yaml                     the run's identity (resolved config minus settings that cannot change results)
RUN/data/                           calibration.safetensors, validation.safetensors: the token windows as first read
RUN/teacher/                        dense top-K targets of the calibration set
RUN/teacher-validation/             dense top-K targets of the validation windows (data.num_validation_sequences)
RUN/teacher-hidden/                 dense decoder-block outputs at 3 blocks (search.fitness: kl+hidden)
RUN/iter-N/supernet/                iteration N's supernet (manifest.json + variants, build.json: device memory)
RUN/iter-N/supernet-offload/        hidden states of a running build with supernet.offload=disk (temporary)
RUN/iter-N/search/                  state.json, history.jsonl (and optuna.journal for sampled methods)
RUN/iter-N/allocation.json          how a one-shot method chose (OWL's ratios, ...)
RUN/iter-N/result.json              iteration N's chosen genome, fitness, validation KL and its units removed per gene
RUN/final/selection.json            which iteration's result the final model is (iteration + genome + validation KL)
RUN/final/architecture.json         kept units per layer, exact parameter counts
RUN/final/metrics.json              dense / uniform / searched held-out numbers
RUN/report.md, RUN/plots/           `tyr report`
```

Readers here never go through the typed config except `load_config`: `tyr status` and `tyr report` read a run
written by another Tyr version as plain data. Writers are atomic (`tyr.io`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tyr.errors import TyrError
from tyr.io import atomic_write_json, atomic_write_text, sha256_text

MARKER = ".tyr-run"
LOCK = ".lock"
MARKER_FORMAT = 1
CONFIG = "config.yaml"
BUILD_LEDGER = "build.json"
OFFLOAD_SUFFIX = "-offload"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """The genome the final model is made of and the iteration (supernet) it comes from."""

    iteration: int
    genome: tuple[int, ...]
    fitness: float | None = None
    method: str | None = None
    validation_kl: float | None = None  # None: the run has no validation windows


class RunDir:
    """A run directory (it need not exist yet). Paths, which files exist, and typed reads of them."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ---- layout ------------------------------------------------------------------------------------------
    @property
    def marker_path(self) -> Path:
        return self.path / MARKER

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def inputs_path(self) -> Path:
        """What the run's inputs were by content (the base model's weight hash): checked on resume."""
        return self.path / "inputs.json"

    @property
    def teacher_dir(self) -> Path:
        return self.path / "teacher"

    def tokens_path(self, name: str) -> Path:
        """`RUN/data/<name>.safetensors`: the run's token windows (calibration, validation) as first read.

        A resumed run (and every Ray worker) reads them from here instead of the data source, so a hub dataset
        that changed since, or a data file moved away, cannot stop the run or change its numbers.
        """
        return self.path / "data" / f"{name}.safetensors"

    @property
    def validation_teacher_dir(self) -> Path:
        """Dense top-K targets of the validation windows (never read by the supernet build or the search)."""
        return self.path / "teacher-validation"

    @property
    def teacher_hidden_dir(self) -> Path:
        """The dense teacher's decoder-block outputs at a few blocks (`search.fitness: kl+hidden`)."""
        return self.path / "teacher-hidden"

    def iteration_dir(self, iteration: int) -> Path:
        return self.path / f"iter-{int(iteration)}"

    def supernet_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "supernet"

    def manifest_path(self, iteration: int) -> Path:
        return self.supernet_dir(iteration) / "manifest.json"

    def build_ledger_path(self, iteration: int) -> Path:
        """The device-memory ledger of the command that last built iteration N's supernet."""
        return build_ledger_path(self.supernet_dir(iteration))

    def offload_dir(self, iteration: int) -> Path:
        """Where a build of iteration N's supernet keeps offloaded hidden states (removed when it ends)."""
        return offload_dir(self.supernet_dir(iteration))

    def search_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "search"

    def state_path(self, iteration: int) -> Path:
        return self.search_dir(iteration) / "state.json"

    def history_path(self, iteration: int) -> Path:
        return self.search_dir(iteration) / "history.jsonl"

    def journal_path(self, iteration: int) -> Path:
        return self.search_dir(iteration) / "optuna.journal"

    def allocation_path(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "allocation.json"

    def result_path(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "result.json"

    @property
    def final_dir(self) -> Path:
        return self.path / "final"

    @property
    def selection_path(self) -> Path:
        return self.final_dir / "selection.json"

    @property
    def architecture_path(self) -> Path:
        return self.final_dir / "architecture.json"

    @property
    def metrics_path(self) -> Path:
        return self.final_dir / "metrics.json"

    def relative(self, path: Path) -> str:
        """`path` relative to the run directory, for messages."""
        try:
            return str(path.relative_to(self.path))
        except ValueError:
            return str(path)

    # ---- what exists ---------------------------------------------------------------------------------------
    def is_tyr_folder(self) -> bool:
        """True when Tyr wrote this folder: it has the marker, or is a run of an older Tyr (config + teacher)."""
        if self.marker_path.is_file():
            return True
        return self.config_path.is_file() and self.teacher_dir.is_dir()

    def has_teacher(self) -> bool:
        return (self.teacher_dir / "meta.json").is_file()

    def iterations(self) -> list[int]:
        """Indices N of the existing iter-N folders, ascending."""
        if not self.path.is_dir():
            return []
        found = []
        for child in self.path.iterdir():
            name = child.name
            if child.is_dir() and name.startswith("iter-") and name[5:].isdigit():
                found.append(int(name[5:]))
        return sorted(found)

    def finished_iterations(self) -> list[int]:
        return [i for i in self.iterations() if self.result_path(i).is_file()]

    def is_finished(self) -> bool:
        return self.metrics_path.is_file()

    # ---- reading -------------------------------------------------------------------------------------------
    def read_config(self) -> dict:
        """config.yaml as plain data; TyrError when this is not a run directory."""
        if not self.path.is_dir():
            raise TyrError(f"run directory {self.path} does not exist")
        if not self.config_path.is_file():
            raise TyrError(
                f"{self.path} is not a Tyr run directory (no {CONFIG}); pass the --out folder of `tyr run`"
            )
        from tyr.config import load_yaml  # one-line messages for unreadable, non-UTF-8 or invalid YAML

        data = load_yaml(self.config_path)
        if not data:
            raise TyrError(f"{self.config_path} does not hold a run config")
        return data

    def identity_hash(self) -> str:
        """sha256 of config.yaml as stored: the run's identity in every checkpoint.

        The stored text, not the current config's dump: a run written before a setting existed keeps its hash
        when that setting is added (see `tyr.config.stored_identity`).
        """
        return sha256_text(self.identity_text())

    def identity_text(self) -> str:
        return self.config_path.read_text()

    def load_config(self):
        """The typed RunConfig of this run (keys an older Tyr did not write read as their defaults)."""
        from tyr.config import config_from_stored

        return config_from_stored(self.read_config(), where=str(self.config_path))

    def read_result(self, iteration: int) -> dict | None:
        return read_json_object(self.result_path(iteration))

    def read_state(self, iteration: int) -> dict | None:
        return read_json_object(self.state_path(iteration))

    def read_history(self, iteration: int) -> list[dict]:
        return read_history(self.history_path(iteration))

    def read_manifest(self, iteration: int) -> dict | None:
        return read_json_object(self.manifest_path(iteration))

    def read_architecture(self) -> dict | None:
        return read_json_object(self.architecture_path)

    def read_metrics(self) -> dict | None:
        return read_json_object(self.metrics_path)

    def history_evaluations(self, iteration: int) -> int:
        """Fitness evaluations recorded in an iteration's search history."""
        return sum(int(row.get("num_evaluations", 0)) for row in self.read_history(iteration))

    def evaluations(self, iterations: list[int]) -> int:
        """Fitness evaluations spent by the given (finished) iterations."""
        return sum(int((self.read_result(i) or {}).get("evaluations", 0)) for i in iterations)

    def selection(self) -> Selection:
        """The final model's genome and iteration: final/selection.json, or (runs of an older Tyr) the last
        finished iteration's result. TyrError when neither exists."""
        data = read_json_object(self.selection_path)
        source = self.selection_path
        if data is None:
            finished = self.finished_iterations()
            if not finished:
                raise TyrError(
                    f"the run in {self.path} has no finished iteration; re-run the same `tyr run` command"
                )
            source = self.result_path(finished[-1])
            data = read_json_object(source) or {}
        try:
            return Selection(
                int(data["iteration"]),
                tuple(int(x) for x in data["genome"]),
                data.get("fitness"),
                data.get("method"),
                data.get("validation_kl"),
            )
        except (KeyError, TypeError, ValueError):
            raise TyrError(
                f"{source} is corrupt (no iteration/genome); delete it and re-run `tyr run`"
            ) from None

    # ---- exclusive use ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Hold RUN/.lock (flock, exclusive) for a command that writes the run; released when the command
        ends or its process dies. A second process gets TyrError at once. Needs a filesystem with working
        flock (local disks, NFSv4, Lustre/GPFS with flock enabled).

        A folder this call created and nothing else wrote into (e.g. the model failed to load) is removed again.
        """
        if self.path.exists() and not self.path.is_dir():
            raise TyrError(f"--out {self.path} is a file, not a folder; choose another --out")
        created = not self.path.exists()
        created_lock = created or not self.lock_path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise TyrError(f"cannot create the run directory {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TyrError(
                f"{self.path} is in use by another Tyr process (pid {holder}); wait for it to finish, or stop it "
                "and re-run this command to resume"
            ) from None
        except OSError as e:
            os.close(fd)
            raise TyrError(
                f"cannot lock {self.lock_path} ({e.strerror or e}): Tyr needs a filesystem with working flock "
                "for its run directories"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            if self.is_tyr_folder():  # never delete anything in a folder Tyr did not write
                self.sweep_temporary_files()
            yield self
        finally:
            if created_lock and not self.marker_path.is_file():  # refused before the run was opened:
                self.lock_path.unlink(missing_ok=True)  # leave a folder that is not Tyr's as it was
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            if created and not any(self.path.iterdir()):
                with contextlib.suppress(OSError):
                    self.path.rmdir()

    def sweep_temporary_files(self) -> list[Path]:
        """Remove what killed writers left behind: `.<name>.*.tmp` files of atomic writes (a killed teacher
        pass leaves one as large as the targets) and the offload folders of killed supernet builds (as large
        as the calibration set's hidden states). Only under the lock: no live writer can own them."""
        swept = []
        for path in self.path.rglob(".*.tmp"):
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                swept.append(path)
        for iteration in self.iterations():
            path = self.offload_dir(iteration)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
                swept.append(path)
        if swept:
            logger.warning(
                "removed %d temporary file(s) left by an interrupted run in %s", len(swept), self.path
            )
        return swept

    # ---- opening for `tyr run` / `tyr build` ------------------------------------------------------------------
    def check_open(self, identity_text: str, force: bool, protect: tuple[Path, ...] = ()) -> str:
        """What opening this folder for a run with config `identity_text` would do: "new", "resume" or
        "replace" (`force` and a Tyr folder with another config). Writes nothing; TyrError when refused.

        `--force` only ever replaces a folder Tyr wrote, never one that holds (or is inside) a protected
        folder (the model), the filesystem root, the home folder or the working directory.
        """
        if self.path.exists() and not self.path.is_dir():
            raise TyrError(f"--out {self.path} is a file, not a folder; choose another --out")
        if not self.path.is_dir() or not self._children():
            return "new"
        if self.config_path.is_file() and self.is_tyr_folder():
            difference = config_difference(self.read_config(), identity_text)
            if difference is None:
                return "resume"
            if not force:
                raise TyrError(
                    f"{self.path} holds a run with a different config ({difference}); use another --out, "
                    "or --force to discard that run"
                )
        elif not force:
            raise TyrError(
                f"output folder {self.path} is not empty and holds no Tyr run; use another --out"
                + (" (or --force, which replaces only folders Tyr wrote)" if self.is_tyr_folder() else "")
            )
        self._check_replaceable(protect)
        return "replace"

    def _check_replaceable(self, protect: tuple[Path, ...]) -> None:
        here = self.path.resolve()
        guarded = [
            (Path("/"), "the filesystem root"),
            (Path.home(), "your home folder"),
            (Path.cwd(), "the working directory"),
            *((Path(p), "the model folder") for p in protect),
        ]
        for other, what in guarded:
            other = other.resolve()
            if here == other or here in other.parents:
                holds = "is" if here == other else "holds"
                raise TyrError(
                    f"--force would delete {here}, which {holds} {what} ({other}); choose another --out"
                )
        if (self.path / "config.json").exists() or not self.is_tyr_folder():
            raise TyrError(
                f"{self.path} was not written by Tyr (no {MARKER} marker); --force only replaces Tyr run "
                "directories. Choose another --out, or remove the folder yourself"
            )

    def _children(self) -> list[Path]:
        """What the folder holds besides the lock file."""
        return [p for p in self.path.iterdir() if p.name != LOCK]

    def open(self, identity_text: str, action: str) -> None:
        """Carry out `check_open`'s answer: empty a replaced run (the lock file stays: it is held), then write
        config.yaml and the marker, and check sub-folders that are symlinks."""
        if action == "replace":
            for child in self._children():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        self.check_linked_folders()
        if action != "resume":
            self.write_config(identity_text)
        if not self.marker_path.is_file():
            self.write_marker()

    def check_linked_folders(self) -> None:
        """Sub-folders that are symlinks (teacher/ or iter-N/ put on a bigger disk, ...) must point to an empty
        folder or one Tyr marked; anything else would let a run overwrite files elsewhere."""
        for child in self._children():
            check_folder_link(child)
            if child.is_dir() and child.name.startswith("iter-"):
                for grandchild in child.iterdir():
                    check_folder_link(grandchild)

    def check_inputs(self, inputs: dict, record: bool = True) -> None:
        """Record `inputs` (content hashes) on the first command; later commands must see the same ones.

        A value of None (could not be computed) is neither recorded over an old one nor compared. Commands
        that only read the run (export, eval) pass `record=False`."""
        stored = read_json(self.inputs_path)
        stored = stored if isinstance(stored, dict) else {}
        for key, value in inputs.items():
            old = stored.get(key)
            if value is not None and old is not None and old != value:
                raise TyrError(
                    f"{key} differs from when the run in {self.path} began ({old[:12]}… then, {value[:12]}… now): "
                    "its teacher targets and supernets came from the old inputs. Restore them, or start a new "
                    "run (another --out, or --force to discard this one)"
                )
        merged = {**stored, **{k: v for k, v in inputs.items() if v is not None}}
        if record and merged != stored:
            atomic_write_json(self.inputs_path, merged)

    # ---- writing -------------------------------------------------------------------------------------------
    def write_marker(self) -> None:
        from tyr import __version__

        atomic_write_json(self.marker_path, {"format": MARKER_FORMAT, "tyr_version": __version__})

    def write_config(self, text: str) -> None:
        atomic_write_text(self.config_path, text)

    def write_result(self, iteration: int, result: dict) -> None:
        atomic_write_json(self.result_path(iteration), result)

    def write_selection(self, selection: Selection) -> None:
        atomic_write_json(
            self.selection_path,
            {
                "iteration": selection.iteration,
                "genome": list(selection.genome),
                "fitness": selection.fitness,
                "method": selection.method,
                "validation_kl": selection.validation_kl,
            },
        )


def build_ledger_path(supernet_dir: Path) -> Path:
    """The device-memory ledger (`build.json`) of the supernet in `supernet_dir`."""
    return Path(supernet_dir) / BUILD_LEDGER


def offload_dir(supernet_dir: Path) -> Path:
    """The default folder for the offloaded hidden states of a build of the supernet in `supernet_dir`: beside
    it (RUN/iter-N/supernet-offload/), outside the supernet so that its manifest never sees the files."""
    supernet_dir = Path(supernet_dir)
    return supernet_dir.parent / f"{supernet_dir.name}{OFFLOAD_SUFFIX}"


def check_folder_link(path: Path) -> None:
    """Tyr writes through a symlinked folder only when its target is empty (then marked) or Tyr-marked."""
    if not path.is_symlink():
        return
    target = path.resolve()
    if not target.is_dir():
        raise TyrError(f"{path} is a symlink to {target}, which is not a folder; remove the link")
    if (target / MARKER).is_file():
        return
    if any(target.iterdir()):
        raise TyrError(
            f"{path} links to {target}, which holds files Tyr did not write; Tyr writes through a linked "
            "folder only when it is empty or was written by Tyr. Point the link at an empty folder"
        )
    atomic_write_json(target / MARKER, {"format": MARKER_FORMAT, "linked_from": str(path.absolute())})


def config_difference(stored: dict, identity_text: str) -> str | None:
    """None when a stored config.yaml describes the same run as `identity_text`, else the first difference.

    Keys the stored config lacks read as their defaults (an older Tyr did not know them; defaults of added
    keys reproduce the older behaviour), so adding a setting never orphans an existing run; where a preset now
    sets such a key, the preset's value counts as the default (`tyr.config.resumed_identity`).
    """
    from tyr.config import config_from_stored, identity_dict, resumed_identity

    current = yaml.safe_load(identity_text)
    if isinstance(current, dict):
        current = resumed_identity(stored, current)
    try:
        old = identity_dict(config_from_stored(stored))
    except TyrError as e:
        return f"it was written by another version of Tyr ({e}); finish it with that version"
    return _first_difference(old, current)


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if diff is not None:
                return diff
        return None
    if old != new:
        return f"{prefix.rstrip('.')}: {old!r} there vs {new!r} now"
    return None


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is missing or unreadable (a run may be mid-write elsewhere)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_json_object(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing, unreadable or not an object."""
    data = read_json(path)
    return data if isinstance(data, dict) else None


def read_history(path: Path) -> list[dict]:
    """history.jsonl lines; a torn last line (killed mid-append) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
