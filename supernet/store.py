"""The supernet on disk: compact variants as safetensors plus a manifest with a fingerprint.

Layout: `DIR/manifest.json` and `DIR/<layer>/<attn|mlp>/<level>.safetensors` holding `kept` (int64 unit
indices) and `weight` (re-fitted output-projection columns). The manifest is rewritten atomically after every
finished gene, so a killed build resumes at the first unfinished gene.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load as safetensors_load

from tyr.errors import TyrError
from tyr.io import atomic_write_json, atomic_write_tensors, sha256_json
from tyr.supernet.ladder import Ladder
from tyr.supernet.variant import Gene, Variant

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LevelEntry:
    level: int
    sparsity: float
    kept: tuple[int, ...]
    params: int
    file: str
    sha256: str
    error: float | None = None  # relative local reconstruction error (None in supernets built before it)


def variant_path(gene: Gene, level: int) -> str:
    return f"{gene.layer}/{gene.kind}/{level:+d}.safetensors"


class SupernetStore:
    """Read/write access to one supernet directory, bound to one fingerprint."""

    def __init__(self, directory: str | Path, fingerprint: dict, cache_bytes: int = 1 << 30):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.fingerprint_hash = sha256_json(fingerprint)
        self._genes: dict[str, dict] = {}
        self._cache: OrderedDict[tuple[str, int], Variant] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0

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
                store._genes = manifest["genes"]
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
    def open(cls, directory: str | Path, fingerprint: dict | None = None) -> SupernetStore:
        """Open a finished supernet for reading; `fingerprint` (if given) must match."""
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise TyrError(f"no supernet at {directory} (missing {MANIFEST}); build it with `tyr build`")
        manifest = _read_manifest(path)
        store = cls(directory, fingerprint if fingerprint is not None else manifest["fingerprint"])
        if manifest["fingerprint_hash"] != store.fingerprint_hash:
            raise TyrError(
                f"the supernet at {directory} does not belong to this run "
                f"({_first_difference(manifest['fingerprint'], store.fingerprint)})"
            )
        store._genes = manifest["genes"]
        return store

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
        return [
            LevelEntry(
                int(lv), e["sparsity"], tuple(e["kept"]), e["params"], e["file"], e["sha256"], e.get("error")
            )
            for lv, e in ((int(k), v) for k, v in g["levels"].items())
        ]

    def level_entry(self, gene: Gene, level: int) -> LevelEntry:
        entry = self._entry(gene)["levels"].get(str(level))
        if entry is None:
            raise TyrError(f"gene {gene.name} has no level {level} in {self.directory}")
        return LevelEntry(
            level,
            entry["sparsity"],
            tuple(entry["kept"]),
            entry["params"],
            entry["file"],
            entry["sha256"],
            entry.get("error"),
        )

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
        """Persist all levels of one gene, then record it in the manifest (atomic, in that order)."""
        levels = {}
        errors = errors if errors is not None else [None] * len(variants)
        for variant, n_params, error in zip(variants, params, errors, strict=True):
            rel = variant_path(ladder.gene, variant.level)
            tensors = {"kept": variant.kept, "weight": variant.weight}
            if variant.bias is not None:
                tensors["bias"] = variant.bias
            sha = atomic_write_tensors(
                self.directory / rel,
                tensors,
                metadata={"gene": ladder.gene.name, "level": str(variant.level)},
            )
            levels[str(variant.level)] = {
                "sparsity": variant.sparsity,
                "kept": variant.kept.tolist(),
                "params": int(n_params),
                "file": rel,
                "sha256": sha,
            }
            if error is not None:
                levels[str(variant.level)]["error"] = float(error)
        self._genes[ladder.gene.name] = {
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
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_json(
            self.directory / MANIFEST,
            {
                "format": FORMAT_VERSION,
                "fingerprint": self.fingerprint,
                "fingerprint_hash": self.fingerprint_hash,
                "genes": self._genes,
            },
        )

    # ---- variants ------------------------------------------------------------------------------
    def variant(self, gene: Gene, level: int) -> Variant:
        """Load (and sha256-verify) one variant; recently used variants stay in a bounded cache."""
        key = (gene.name, level)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        entry = self.level_entry(gene, level)
        variant = self._read_variant(gene, entry)
        self._remember(key, variant)
        return variant

    def verify(self) -> None:
        """Check every variant file against its recorded sha256 (reads them all); TyrError naming the first
        missing or changed one."""
        for gene in self.genes():
            for entry in self.level_entries(gene):
                self._read_variant(gene, entry)

    def verify_gene(self, gene: Gene) -> bool:
        """True if every level file of the gene exists and matches its recorded sha256."""
        try:
            for entry in self.level_entries(gene):
                self._read_variant(gene, entry)
        except TyrError:
            return False
        return True

    def _read_variant(self, gene: Gene, entry: LevelEntry) -> Variant:
        import hashlib

        path = self._variant_file(gene, entry)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TyrError(
                f"variant file {path} is missing; rebuild the supernet (re-run the same command)"
            ) from None
        sha = hashlib.sha256(data).hexdigest()
        if sha != entry.sha256:
            raise TyrError(f"variant file {path} is corrupt (sha256 mismatch); re-run the build to repair it")
        tensors = safetensors_load(data)
        return Variant(
            gene,
            entry.level,
            entry.sparsity,
            tensors["kept"],
            tensors["weight"],
            key=sha,
            bias=tensors.get("bias"),
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

    def _remember(self, key: tuple[str, int], variant: Variant) -> None:
        size = _nbytes(variant)
        self._cache[key] = variant
        self._cached_bytes += size
        while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= _nbytes(old)


def _nbytes(variant: Variant) -> int:
    bias = 0 if variant.bias is None else variant.bias.numel() * variant.bias.element_size()
    return variant.weight.numel() * variant.weight.element_size() + bias


_VARIANT_FILE = re.compile(r"[+-]\d+\.safetensors")


def _unfinished_build_files(directory: Path) -> list[Path] | None:
    """The files a build killed before recording its first gene leaves (variant files, temp files), or None
    when the folder holds anything else."""
    files = []
    for path in directory.rglob("*"):
        rel = path.relative_to(directory).parts
        if path.is_symlink():
            return None
        if path.is_dir():
            ok = rel[0].isdigit() and (len(rel) == 1 or (len(rel) == 2 and rel[1] in ("attn", "mlp")))
        else:
            name = rel[-1]
            in_gene = len(rel) == 3 and rel[0].isdigit() and rel[1] in ("attn", "mlp")
            ok = (in_gene and (_VARIANT_FILE.fullmatch(name) or name.endswith(".tmp"))) or (
                len(rel) == 1 and name.startswith(f".{MANIFEST}.") and name.endswith(".tmp")
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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "genes" not in manifest:
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
