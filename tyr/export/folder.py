"""The output folder of an export: refuse to overwrite what must survive, write everything into a private temp
folder next to it, and rename that into place at the end, so an interrupted export leaves nothing half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tyr.errors import TyrError
from tyr.export.architecture import ARCHITECTURE_FILE


def check_output_folder(out: Path, force: bool, protect: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse a non-empty ``out`` unless ``force``; never one that holds (or is) a protected folder."""
    if not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    resolved = out.resolve()
    for p in protect:
        q = Path(p).resolve()
        inside = q in resolved.parents and not _is_export(out)  # e.g. RUN/final: only a former export may go
        if resolved == q or resolved in q.parents or inside:
            raise TyrError(f"--out {out} would overwrite {q}; choose another output folder")
    if not force:
        what = "folder" if out.is_dir() else "file"
        raise TyrError(f"output {what} {out} exists and is not empty; choose another --out or pass --force")
    if not _is_export(out) or out.is_symlink():
        raise TyrError(
            f"{out} is not an earlier `tyr export` (no config.json + {ARCHITECTURE_FILE}); --force replaces only "
            "an earlier export. Choose another --out, or remove the folder yourself"
        )


def _is_export(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / ARCHITECTURE_FILE).is_file()


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temp folder next to ``out`` to write the export into; on success it replaces ``out``, on any error
    (or interrupt) it is deleted and ``out`` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        _share_modes(tmp)
        _fsync_tree(tmp)
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sweep_leftovers(out: Path) -> None:
    """Remove the temp folders a killed export of `out` left next to it (two exports to one --out at the same
    time are not supported)."""
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)


def _share_modes(folder: Path) -> None:
    """Temp folders and atomically written files are private (0700/0600); give the export the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_tree(folder: Path) -> None:
    """Make every file (written by huggingface_hub and transformers without fsync) durable before the rename."""
    for path in [*folder.rglob("*"), folder]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:  # directories cannot be fsynced on every platform / filesystem
            pass
        finally:
            os.close(fd)


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is set aside first and deleted last."""
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-")) / "x"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)
