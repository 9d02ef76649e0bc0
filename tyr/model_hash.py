"""The base model's identity by content: a hash of its weight and config files, computed once and cached.

A run records it (`RUN/inputs.json`) and a resumed run refuses to continue on weights that changed in place
since it began: its teacher targets and supernets were computed from the old ones. Hashing reads every
byte once (about a minute for 16 GB); the result is cached per file by (path, size, mtime), so later runs
and resumes of the same files cost a `stat` each.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tyr.io import atomic_write_json, sha256_file, sha256_json

logger = logging.getLogger(__name__)

CONTENT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "config.json")
CACHE_FILE = "weight-hashes.json"


def model_files(folder: Path) -> list[Path]:
    """The files that define a model folder's function (weights and config.json), sorted by name."""
    found = {p for pattern in CONTENT_FILES for p in folder.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def folder_sha256(folder: Path, cache_dir: Path) -> str | None:
    """sha256 over (name, sha256) of the folder's model files; None when it holds none."""
    files = model_files(folder)
    if not files:
        return None
    cache_path = cache_dir / CACHE_FILE
    cache = _read_cache(cache_path)
    entries, changed = [], False
    for path in files:
        stat = path.stat()  # follows the hub cache's symlinks to its blobs
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in cache:
            logger.info("hashing %s (%.1f GB, once per file)", path, stat.st_size / 1e9)
            cache[key] = sha256_file(path)
            changed = True
        entries.append([path.name, cache[key]])
    if changed:
        try:
            atomic_write_json(cache_path, cache)
        except OSError as e:  # a read-only cache costs a re-hash next time, nothing else
            logger.warning("cannot write the weight-hash cache %s: %s", cache_path, e)
    return sha256_json(entries)


def _read_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return (
        {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
        if isinstance(data, dict)
        else {}
    )


def local_folder(path: str) -> Path | None:
    """The local folder a model was loaded from: the path itself, or a hub id's snapshot in the local cache."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True, allow_patterns=list(CONTENT_FILES)))
    except (OSError, ValueError):  # not in the local cache, or not a hub id: the caller skips the check
        return None
