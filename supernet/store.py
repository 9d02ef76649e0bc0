"""The supernet on disk: compact variants as safetensors, a manifest with a fingerprint, per-gene records.

Layout: `DIR/manifest.json` and `DIR/<layer>/<attn|mlp>/<level>.safetensors` holding `kept` (int64 unit
indices) and `weight` (re-fitted output-projection columns). While a build runs, each finished gene also gets
`DIR/genes/<layer>.<attn|mlp>.json`: a small record of its levels (kept units, parameter cost, file, size,
sha256), written atomically after the gene's variant files; the manifest is then rewritten as a short index of
the finished genes (a few hundred bytes per gene, no kept lists), so the bookkeeping per gene written is
O(genes), not O(supernet), and a killed build resumes at the first unfinished gene. When the last gene of the
fingerprint's ladders is recorded (or on `finish`), the manifest is written once in full (every gene's levels)
and the records are removed. Supernets written by the previous format (1: the full manifest rewritten after
every gene) open and resume as they are.

Reading: the first read of a variant file in a store checks its sha256 (counted in `files_hashed`); later
reads of the same file check its size only. A store opened with `hash_files=False` (a Ray worker, whose driver
verified the supernet) checks sizes only. Loaded variants stay in a bounded LRU (`set_cache_bytes`), which may
hold the whole supernet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load

from tyr.errors import TyrError
from tyr.io import atomic_write_json, atomic_write_tensors, atomic_write_text, sha256_json
from tyr.supernet.ladder import Ladder
from tyr.supernet.variant import Gene, Variant

MANIFEST = "manifest.json"
RECORDS = (
    "genes"  # DIR/genes/<gene>.json: one record per gene finished since the manifest was last written whole
)
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
DEFAULT_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class LevelEntry:
    level: int
    sparsity: float
    kept: tuple[int, ...]
    params: int
    file: str
    sha256: str
    error: float | None = None  # relative local reconstruction error (None in supernets built before it)
    bytes: int | None = None  # size of the file (None in supernets of format 1)


def variant_path(gene: Gene, level: int) -> str:
    return f"{gene.layer}/{gene.kind}/{level:+d}.safetensors"


def _level_entry(level: int, e: dict) -> LevelEntry:
    return LevelEntry(
        level,
        e["sparsity"],
        tuple(e["kept"]),
        e["params"],
        e["file"],
        e["sha256"],
        e.get("error"),
        e.get("bytes"),
    )


class SupernetStore:
    """Read/write access to one supernet directory, bound to one fingerprint.

    Attributes:
        bytes_read: bytes of variant files read by this store.
        files_hashed: variant files whose sha256 this store computed.
        hash_files: whether the first read of a file checks its sha256 (else its size only).
    """

    def __init__(
        self,
        directory: str | Path,
        fingerprint: dict,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        hash_files: bool = True,
    ):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.fingerprint_hash = sha256_json(fingerprint)
        self.hash_files = hash_files
        self.bytes_read = 0
        self.files_hashed = 0
        self._genes: dict[str, dict] = {}
        self._recorded: set[str] = set()  # genes whose record file is on disk (not yet in a full manifest)
        self._hashed: set[str] = set()  # files whose sha256 this store checked (or wrote)
        self._sizes: dict[str, int] = {}  # file -> size seen when it was hashed, written or first read
        self._cache: OrderedDict[tuple[str, int], Variant] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._device: torch.device | None = (
            None  # where cached variants are kept while `_device_budget` allows
        )
        self._device_budget = 0
        self._device_bytes = 0  # bytes of cached variants on `_device`

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, directory: str | Path, fingerprint: dict, force: bool = False) -> SupernetStore:
        """Open for building: resume a matching manifest, refuse a foreign one unless `force`."""
        store = cls(directory, fingerprint)
        path = store.directory / MANIFEST
        if path.exists():
            manifest = _read_manifest(path)
            if manifest.get("fingerprint_hash") != store.fingerprint_hash and not force:
                raise TyrError(
                    f"{store.directory} holds a supernet built with different settings "
                    f"({_first_difference(manifest.get('fingerprint', {}), fingerprint)}); "
                    "use another output folder or --force to rebuild"
                )
            if manifest.get("fingerprint_hash") == store.fingerprint_hash:
                store._load_genes(manifest)
                if store._recorded and store._all_built():  # killed between the last record and the manifest
                    store._write_manifest()
            else:  # --force over another supernet: its records must not mix with this build's
                shutil.rmtree(store.directory / RECORDS, ignore_errors=True)
        elif store.directory.exists() and any(store.directory.iterdir()):
            leftovers = _unfinished_build_files(store.directory)
            if leftovers is None and not force:
                raise TyrError(
                    f"{store.directory} is not empty and holds no supernet manifest; use another folder"
                )
            for path in leftovers or ():  # a build killed before its first gene was recorded: start over
                path.unlink()
        store.directory.mkdir(parents=True, exist_ok=True)
        return store

    @classmethod
    def open(
        cls, directory: str | Path, fingerprint: dict | None = None, *, hash_files: bool = True
    ) -> SupernetStore:
        """Open a finished supernet for reading; `fingerprint` (if given) must match. `hash_files=False`: reads
        check file sizes only (for processes whose driver verified the supernet)."""
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise TyrError(f"no supernet at {directory} (missing {MANIFEST}); build it with `tyr build`")
        manifest = _read_manifest(path)
        store = cls(
            directory,
            fingerprint if fingerprint is not None else manifest["fingerprint"],
            hash_files=hash_files,
        )
        if manifest["fingerprint_hash"] != store.fingerprint_hash:
            raise TyrError(
                f"the supernet at {directory} does not belong to this run "
                f"({_first_difference(manifest['fingerprint'], store.fingerprint)})"
            )
        store._load_genes(manifest)
        return store

    @classmethod
    def reader(cls, directory: str | Path, fingerprint_hash: str) -> SupernetStore:
        """The genes finished so far in a supernet another process is building (a cluster worker propagating
        them): file sizes are checked, not hashes (the builder hashed what it wrote)."""
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise TyrError(f"no supernet being built at {directory} (missing {MANIFEST})")
        manifest = _read_manifest(path)
        if manifest.get("fingerprint_hash") != fingerprint_hash:
            raise TyrError(
                f"the supernet at {directory} is not the one being built (fingerprint differs): the run "
                "directory must be on storage shared by every node"
            )
        store = cls(directory, manifest["fingerprint"], hash_files=False)
        store._load_genes(manifest)
        return store

    def _load_genes(self, manifest: dict) -> None:
        """The finished genes: the manifest's full entries, completed by the records of genes finished since."""
        genes = dict(manifest["genes"])
        records = self._read_records()
        for name, entry in records.items():
            if "levels" not in genes.get(name, {}):
                genes[name] = entry
        self._genes = {
            name: g for name, g in genes.items() if "levels" in g
        }  # an index entry without a record
        self._recorded = set(records) & set(self._genes)  # is a gene whose record was lost: built again

    def _read_records(self) -> dict[str, dict]:
        records = {}
        folder = self.directory / RECORDS
        if not folder.is_dir():
            return records
        for path in sorted(folder.glob("*.json")):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # unreadable: the gene counts as unfinished and is built again
            if (
                isinstance(record, dict)
                and record.get("fingerprint_hash") == self.fingerprint_hash
                and record.get("gene") == path.stem
                and isinstance(record.get("entry"), dict)
                and "levels" in record["entry"]
            ):
                records[path.stem] = record["entry"]
        return records

    # ---- manifest ------------------------------------------------------------------------------
    def is_complete(self, gene: Gene) -> bool:
        return self._genes.get(gene.name, {}).get("complete", False)

    def genes(self) -> list[Gene]:
        return [Gene(int(g["layer"]), g["kind"]) for g in self._genes.values()]

    def ladder(self, gene: Gene) -> Ladder:
        g = self._entry(gene)
        return Ladder(gene, g["num_units"], g["centre_removed"], g["step"], tuple(g["levels_order"]))

    def level_entries(self, gene: Gene) -> list[LevelEntry]:
        g = self._entry(gene)
        return [_level_entry(int(lv), e) for lv, e in g["levels"].items()]

    def level_entry(self, gene: Gene, level: int) -> LevelEntry:
        entry = self._entry(gene)["levels"].get(str(level))
        if entry is None:
            raise TyrError(f"gene {gene.name} has no level {level} in {self.directory}")
        return _level_entry(level, entry)

    def _entry(self, gene: Gene) -> dict:
        g = self._genes.get(gene.name)
        if g is None or not g.get("complete"):
            raise TyrError(f"gene {gene.name} is not built in {self.directory}")
        return g

    def write_gene(
        self,
        ladder: Ladder,
        group_size: int,
        variants: list[Variant],
        params: list[int],
        errors: list[float] | None = None,
    ) -> None:
        """Persist all levels of one gene, then its record, then the manifest's index (atomic, in that order)."""
        errors = errors if errors is not None else [None] * len(variants)
        written = [
            self.write_variant(variant, n_params, error)
            for variant, n_params, error in zip(variants, params, errors, strict=True)
        ]
        self.record_gene(ladder, group_size, written)

    def write_variant(self, variant: Variant, params: int, error: float | None = None) -> dict:
        """`write_variant_file` into this supernet."""
        return write_variant_file(self.directory, variant, params, error)

    def record_gene(self, ladder: Ladder, group_size: int, written: Sequence[dict]) -> None:
        """Record a gene whose level files are written (`write_variant`'s entries, in ladder order): its record,
        then the manifest's index. The files count as verified (their writer hashed the bytes it wrote)."""
        levels = {}
        for entry in written:
            entry = dict(entry)
            level = entry.pop("level")
            if entry["file"] != variant_path(ladder.gene, level):
                raise TyrError(f"gene {ladder.gene.name} level {level}: unexpected file {entry['file']!r}")
            self._hashed.add(entry["file"])
            self._sizes[entry["file"]] = entry["bytes"]
            levels[str(level)] = entry
        name = ladder.gene.name
        entry = {
            "layer": ladder.gene.layer,
            "kind": ladder.gene.kind,
            "num_units": ladder.num_units,
            "group_size": group_size,
            "centre_removed": ladder.centre_removed,
            "step": ladder.step,
            "levels_order": list(ladder.levels),
            "levels": levels,
            "complete": True,
        }
        for key in [k for k in self._cache if k[0] == name]:  # a rebuilt gene's old variants
            self._forget(self._cache.pop(key))
        record = {"fingerprint_hash": self.fingerprint_hash, "gene": name, "entry": entry}
        atomic_write_text(self.directory / RECORDS / f"{name}.json", _compact_json(record))
        self._genes[name] = entry
        self._recorded.add(name)
        self._write_manifest()

    def finish(self) -> None:
        """Write the manifest whole (every gene's levels) and drop the per-gene records; idempotent."""
        if self._recorded:
            self._write_manifest(whole=True)

    def _all_built(self) -> bool:
        """Whether every gene of the fingerprint's ladders (when it lists them) is finished."""
        ladders = self.fingerprint.get("ladders")
        if not isinstance(ladders, list) or not ladders:
            return False
        names = [
            row[0] for row in ladders if isinstance(row, (list, tuple)) and row and isinstance(row[0], str)
        ]
        return len(names) == len(ladders) and all(self._genes.get(n, {}).get("complete") for n in names)

    def _write_manifest(self, whole: bool | None = None) -> None:
        """The manifest: whole once every gene is built (then the records go), else an index of the genes."""
        whole = self._all_built() if whole is None else whole
        head = {
            "format": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "fingerprint_hash": self.fingerprint_hash,
        }
        if whole:
            atomic_write_text(self.directory / MANIFEST, _compact_json({**head, "genes": self._genes}))
            shutil.rmtree(self.directory / RECORDS, ignore_errors=True)
            self._recorded.clear()
            return
        index = {
            name: {k: v for k, v in g.items() if k != "levels"} if name in self._recorded else g
            for name, g in self._genes.items()
        }
        atomic_write_json(self.directory / MANIFEST, {**head, "genes": index})

    # ---- variants ------------------------------------------------------------------------------
    def variant(self, gene: Gene, level: int) -> Variant:
        """Load one variant (its file's sha256 checked on the first read in this store, its size after that);
        recently used variants stay in a bounded cache."""
        key = (gene.name, level)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        entry = self.level_entry(gene, level)
        return self._remember(key, self._read_variant(gene, entry))

    def verify(self, keep: bool = False) -> int:
        """Check every variant file not yet verified by this store against its recorded sha256 (reads them);
        TyrError naming the first missing or changed one. `keep`: loaded variants stay cached while the
        cache has room (one read both verifies and loads a resident supernet). Returns the files hashed."""
        hashed = 0
        for gene in self.genes():
            for entry in self.level_entries(gene):
                if entry.file in self._hashed:
                    continue
                variant = self._read_variant(gene, entry, must_hash=True)
                hashed += 1
                key = (gene.name, entry.level)
                if (
                    keep
                    and key not in self._cache
                    and self._cached_bytes + _nbytes(variant) <= self._cache_bytes
                ):
                    self._remember(key, variant)
        return hashed

    def verify_gene(self, gene: Gene) -> bool:
        """True if every level file of the gene exists and matches its recorded sha256 (a file this store
        verified before: its size)."""
        try:
            for entry in self.level_entries(gene):
                if entry.file in self._hashed:
                    path = self._variant_file(gene, entry)
                    self._check_size(path, entry, _file_size(path))
                else:
                    self._read_variant(gene, entry, must_hash=True)
        except TyrError:
            return False
        return True

    def total_bytes(self) -> int:
        """Bytes of all variant files of the finished genes (what a fully resident supernet holds)."""
        total = 0
        for gene in self.genes():
            for entry in self.level_entries(gene):
                size = self._sizes.get(entry.file, entry.bytes)
                total += size if size is not None else _file_size(self._variant_file(gene, entry))
        return total

    @property
    def cache_bytes(self) -> int:
        return self._cache_bytes

    def set_cache_bytes(self, cache_bytes: int) -> None:
        """Resize the variant cache (least recently used variants leave first)."""
        self._cache_bytes = int(cache_bytes)
        self._evict()

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0
        self._device_bytes = 0

    def set_device_cache(self, device: torch.device | None, device_bytes: int) -> None:
        """Keep up to `device_bytes` of cached variants on `device` (a GPU: a swap is then a copy on the device,
        not a host-to-device transfer); variants already cached move there now, most recently used first, later
        ones as they are read. The values do not change. `device` None (or 0 bytes): every variant in host RAM."""
        self._device, self._device_budget = device, int(device_bytes) if device is not None else 0
        for key in reversed(list(self._cache)):
            self._cache[key] = self._placed(self._cache[key])

    @property
    def device_bytes(self) -> int:
        """Bytes of cached variants held on the device of `set_device_cache`."""
        return self._device_bytes

    def _placed(self, variant: Variant) -> Variant:
        """`variant`, moved to the cache's device when it is not there yet and the device budget has room."""
        if self._device is None or variant.weight.device == self._device:
            return variant
        size = _nbytes(variant)
        if self._device_bytes + size > self._device_budget:
            return variant
        self._device_bytes += size
        return dataclasses.replace(  # `kept` stays in host RAM: a few integers, read as Python values
            variant,
            weight=variant.weight.to(self._device),
            bias=None if variant.bias is None else variant.bias.to(self._device),
        )

    def _forget(self, variant: Variant) -> None:
        """Bookkeeping for a variant leaving the cache."""
        self._cached_bytes -= _nbytes(variant)
        if self._device is not None and variant.weight.device == self._device:
            self._device_bytes -= _nbytes(variant)

    def _read_variant(self, gene: Gene, entry: LevelEntry, must_hash: bool = False) -> Variant:
        path = self._variant_file(gene, entry)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TyrError(
                f"variant file {path} is missing; rebuild the supernet (re-run the same command)"
            ) from None
        self.bytes_read += len(data)
        if entry.file not in self._hashed and (self.hash_files or must_hash):
            self.files_hashed += 1
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise TyrError(
                    f"variant file {path} is corrupt (sha256 mismatch); re-run the build to repair it"
                )
            self._hashed.add(entry.file)
            self._sizes[entry.file] = len(data)
        else:
            self._check_size(path, entry, len(data))
        tensors = safetensors_load(data)
        return Variant(
            gene,
            entry.level,
            entry.sparsity,
            tensors["kept"],
            tensors["weight"],
            key=entry.sha256,  # equal to the file's hash: checked on its first read here, or by the driver
            bias=tensors.get("bias"),
        )

    def _check_size(self, path: Path, entry: LevelEntry, size: int) -> None:
        expected = self._sizes.get(entry.file, entry.bytes)
        if expected is None:
            self._sizes[entry.file] = size  # a format-1 supernet read without hashing: later reads match this
        elif size != expected:
            raise TyrError(
                f"variant file {path} changed size since it was verified ({size} bytes, expected {expected}); "
                "re-run the build to repair it"
            )

    def _variant_file(self, gene: Gene, entry: LevelEntry) -> Path:
        """The variant's file, confined to this supernet: the manifest may only name the file Tyr writes for
        (gene, level), and it must resolve to a regular file inside the folder (no links out, no FIFOs)."""
        if entry.file != variant_path(gene, entry.level):
            raise TyrError(
                f"the manifest of {self.directory} names {entry.file!r} for gene {gene.name} level {entry.level} "
                f"(expected {variant_path(gene, entry.level)!r}); it was not written by Tyr: rebuild the supernet"
            )
        path = self.directory / entry.file
        resolved, root = path.resolve(), self.directory.resolve()
        if root not in resolved.parents or (path.exists() and not resolved.is_file()):
            raise TyrError(
                f"variant file {path} is not a regular file inside {self.directory}; rebuild the supernet"
            )
        return path

    def _remember(self, key: tuple[str, int], variant: Variant) -> Variant:
        variant = self._placed(variant)
        self._cache[key] = variant
        self._cached_bytes += _nbytes(variant)
        self._evict()
        return variant

    def _evict(self) -> None:
        while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._forget(old)


def write_variant_file(
    directory: str | Path, variant: Variant, params: int, error: float | None = None
) -> dict:
    """Write one level's file into the supernet folder `directory` (atomically); its manifest entry, with its
    `level`, for `SupernetStore.record_gene`. Any process may write a gene's files (a cluster's pruning workers
    do); one process records the gene."""
    rel = variant_path(variant.gene, variant.level)
    tensors = {"kept": variant.kept, "weight": variant.weight}
    if variant.bias is not None:
        tensors["bias"] = variant.bias
    metadata = {"gene": variant.gene.name, "level": str(variant.level)}
    path = Path(directory) / rel
    sha = atomic_write_tensors(path, tensors, metadata=metadata)
    entry = {
        "level": variant.level,
        "sparsity": variant.sparsity,
        "kept": variant.kept.tolist(),
        "params": int(params),
        "file": rel,
        "bytes": path.stat().st_size,
        "sha256": sha,
    }
    if error is not None:
        entry["error"] = float(error)
    return entry


def available_host_memory() -> int | None:
    """Bytes of host memory available to new allocations (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_cache_bytes(
    requested: int | None, supernet_bytes: int, share: float = 0.5, available: int | None = None
) -> int:
    """The variant cache size for `requested` (None = auto): the whole supernet when it fits in `share` of the
    available host memory, else that share (an LRU); the default cache when the memory is unknown."""
    if requested is not None:
        return int(requested)
    available = available_host_memory() if available is None else available
    if available is None:
        return DEFAULT_CACHE_BYTES
    budget = int(share * available)
    return supernet_bytes if supernet_bytes <= budget else budget


def resolve_device_cache_bytes(
    requested: int | None,
    supernet_bytes: int,
    device: torch.device | None,
    share: float = 0.4,
    free: int | None = None,
) -> int:
    """Device bytes for cached variants (`SupernetStore.set_device_cache`; None = auto): on a GPU the whole
    supernet when it fits in `share` of the device's free memory, else none (the host cache serves); always 0
    on a CPU or a model spread over several devices (`device` None)."""
    if device is None or device.type == "cpu":
        return 0
    if requested is not None:
        return int(requested)
    if free is None:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    return supernet_bytes if supernet_bytes <= share * free else 0


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise TyrError(
            f"variant file {path} is missing; rebuild the supernet (re-run the same command)"
        ) from None


def _compact_json(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"


def _nbytes(variant: Variant) -> int:
    bias = 0 if variant.bias is None else variant.bias.numel() * variant.bias.element_size()
    return variant.weight.numel() * variant.weight.element_size() + bias


_VARIANT_FILE = re.compile(r"[+-]\d+\.safetensors")
_RECORD_FILE = re.compile(r"\d+\.(attn|mlp)\.json")


def _unfinished_build_files(directory: Path) -> list[Path] | None:
    """The files a build killed before recording its first gene leaves (variant files, a gene record, temp
    files), or None when the folder holds anything else."""
    files = []
    for path in directory.rglob("*"):
        rel = path.relative_to(directory).parts
        if path.is_symlink():
            return None
        if path.is_dir():
            ok = rel == (RECORDS,) or (
                rel[0].isdigit() and (len(rel) == 1 or (len(rel) == 2 and rel[1] in ("attn", "mlp")))
            )
        else:
            name = rel[-1]
            in_gene = len(rel) == 3 and rel[0].isdigit() and rel[1] in ("attn", "mlp")
            in_records = len(rel) == 2 and rel[0] == RECORDS
            ok = (
                (in_gene and (_VARIANT_FILE.fullmatch(name) or name.endswith(".tmp")))
                or (in_records and (_RECORD_FILE.fullmatch(name) or name.endswith(".tmp")))
                or (len(rel) == 1 and name.startswith(f".{MANIFEST}.") and name.endswith(".tmp"))
            )
            files.append(path)
        if not ok:
            return None
    return files


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TyrError(
            f"supernet manifest {path} is unreadable ({e}); delete {path.parent} and re-run to rebuild it"
        ) from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") not in READABLE_FORMATS
        or "genes" not in manifest
    ):
        raise TyrError(
            f"supernet manifest {path} has an unknown format; delete {path.parent} and re-run to rebuild it"
        )
    return manifest


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff = _first_difference(a, b, f"{prefix}{key}.")
            if diff:
                return diff
        elif a != b:
            return f"{prefix}{key}: {_short(a)} there vs {_short(b)} now"
    return ""


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
