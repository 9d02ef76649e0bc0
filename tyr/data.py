"""Calibration and evaluation tokens: resolve `--data`, tokenise, cut into fixed-length sequences.

Documents are joined with newlines (as in a plain text file) and tokenised without special tokens into one
stream, which is cut into non-overlapping windows of `seq_len`. Calibration takes a seeded random subset of the windows
(and validation the next windows of the same permutation); evaluation takes the windows in order. All are
deterministic for a given seed.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tyr.errors import TyrError
from tyr.io import atomic_write_bytes, safetensors_bytes, sha256_tensor

logger = logging.getLogger(__name__)

# Built-in offline corpora: ABC news articles shipped as test data inside the gensim wheel.
BUILTIN_CORPORA = {"lee-background": "lee_background.cor", "lee": "lee.cor"}
_LOADERS = {
    ".txt": "text",
    ".cor": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


@dataclass(frozen=True)
class TextSource:
    """Where text comes from: a built-in alias, local files, or a `datasets` hub name."""

    name: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"


def builtin_corpus_path(alias: str) -> Path:
    spec = importlib.util.find_spec("gensim")  # located, not imported (importing gensim is slow)
    if spec is None or not spec.submodule_search_locations:
        raise TyrError(
            f"the built-in corpus '{alias}' needs the package gensim: pip install --no-deps gensim==4.4.0"
        )
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / BUILTIN_CORPORA[alias]
    if not path.is_file():
        raise TyrError(f"built-in corpus file {path} is missing; reinstall gensim==4.4.0")
    return path


def load_texts(source: TextSource) -> list[str]:
    """Return the non-empty documents of a source, in a stable order."""
    texts = list(iter_texts(source))
    if not texts:
        raise TyrError(f"data {source.name!r} holds no text")
    return texts


def iter_texts(source: TextSource, streaming: bool = False) -> Iterator[str]:
    """The non-empty documents of a source, in a stable order; `streaming` reads hub datasets lazily
    (only as much as is consumed is downloaded)."""
    import datasets

    datasets.disable_progress_bars()
    encoding = "utf-8"
    if source.name in BUILTIN_CORPORA:
        files, loader = [str(builtin_corpus_path(source.name))], "text"
        split, encoding = "train", "latin-1"  # the gensim test corpora are ISO-8859-1
    else:
        path = Path(source.name).expanduser()
        if path.exists():
            files, loader = _local_files(path)
            split = "train"
            if loader == "text":
                _check_text_files(files, encoding)
        elif looks_like_path(source.name):
            raise TyrError(
                f"data path {source.name!r} does not exist (relative paths start at {Path.cwd()}); give an "
                f"existing file or folder ({', '.join(sorted(_LOADERS))}), or a datasets hub name"
            )
        else:
            files, loader, split = None, None, source.split
    ds = _load_dataset(source, files, loader, split, encoding, streaming)
    if isinstance(ds, datasets.IterableDataset):
        return _iter_streamed(ds, source)
    if source.text_field not in ds.column_names:
        raise TyrError(_missing_column(source, ds.column_names))
    return (t for t in ds[source.text_field] if isinstance(t, str) and t.strip())


def _load_dataset(
    source: TextSource,
    files: list[str] | None,
    loader: str | None,
    split: str,
    encoding: str,
    streaming: bool,
):
    """`datasets.load_dataset` for local files (`files`) or a hub name; its failures become one TyrError."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error lines repeat what the TyrError says
    try:
        if files is not None:
            kwargs = {"encoding": encoding, "encoding_errors": "replace"} if loader == "text" else {}
            return datasets.load_dataset(loader, data_files=files, split="train", **kwargs)
        return datasets.load_dataset(source.name, source.config, split=split, streaming=streaming)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise TyrError(f"cannot load data {source.name!r}: {str(e).splitlines()[0]}") from None
    except datasets.exceptions.DatasetGenerationError as e:  # e.g. a malformed .json/.jsonl line
        raise TyrError(_unreadable(source, files, loader, e)) from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def looks_like_path(name: str) -> bool:
    """Whether a `--data` string is meant as a local path rather than a hub dataset name (`org/name`): it
    starts with . / or ~, holds more than one separator (or a backslash), or ends in a data file extension."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in _LOADERS
    )


# A text file whose first 64 KiB are more than this fraction of undecodable bytes (U+FFFD after decoding with
# errors="replace") or control characters is binary, not text: random bytes give ~50%, latin-1 read as
# UTF-8 a few %.
_MAX_GARBAGE_FRACTION = 0.10
_SAMPLE_BYTES = 1 << 16


def _check_text_files(files: list[str], encoding: str) -> None:
    for name in files:
        with open(name, "rb") as f:
            sample = f.read(_SAMPLE_BYTES).decode(encoding, errors="replace")
        if not sample:
            continue
        garbage = sum(1 for ch in sample if ch == "\ufffd" or (ch < " " and ch not in "\t\n\r\f\v"))
        if garbage > _MAX_GARBAGE_FRACTION * len(sample):
            raise TyrError(
                f"data file {name} does not look like text: {garbage / len(sample):.0%} of its first "
                f"{len(sample)} characters are undecodable bytes or control characters (read as {encoding}); "
                "give a plain-text file, or .json/.jsonl/.parquet with a text column"
            )


def _unreadable(source: TextSource, files: list[str] | None, loader: str | None, e: Exception) -> str:
    what = {"json": "valid JSON / JSON Lines", "parquet": "valid Parquet"}.get(loader or "", "readable")
    if files is None:
        return f"cannot read data {source.name!r}: {_cause(e)}"
    if len(files) == 1:
        return f"data file {files[0]} is not {what}: {_cause(e)}"
    return f"data {source.name!r} holds a file that is not {what} (of {len(files)} files): {_cause(e)}"


def _cause(e: BaseException) -> str:
    """The first line of the error behind `e` (datasets wraps the parser's own message)."""
    cause = e.__cause__ or e.__context__ or e
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


def _iter_streamed(ds, source: TextSource) -> Iterator[str]:
    for row in ds:
        if source.text_field not in row:
            raise TyrError(_missing_column(source, list(row)))
        text = row[source.text_field]
        if isinstance(text, str) and text.strip():
            yield text


def _missing_column(source: TextSource, columns: list[str]) -> str:
    return (
        f"data {source.name!r} has no column {source.text_field!r} (columns: {', '.join(columns)}); "
        "set data.text_field"
    )


def _local_files(path: Path) -> tuple[list[str], str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in files if p.suffix.lower() in _LOADERS]
    if not files:
        raise TyrError(f"no data files in {path} (supported: {', '.join(sorted(_LOADERS))})")
    loaders = {_LOADERS[p.suffix.lower()] for p in files}
    if len(loaders) > 1:
        raise TyrError(
            f"{path} mixes file types ({', '.join(sorted(loaders))}); use one type per data folder"
        )
    empty = [p for p in files if p.stat().st_size == 0]
    if len(empty) == len(files):
        raise TyrError(f"data {path} is empty")
    return [str(p) for p in files], loaders.pop()


def token_stream(
    texts: Iterable[str], tokenizer, docs_per_chunk: int = 256, max_tokens: int | None = None
) -> torch.Tensor:
    """Tokenise the documents joined by newlines into one int64 stream (no special tokens).

    Documents are tokenised in newline-joined chunks so that huge corpora need not become one string; with
    `max_tokens`, reading stops (and the stream is cut) once that many tokens are collected.
    """
    ids: list[int] = []
    docs = iter(texts)
    while max_tokens is None or len(ids) < max_tokens:
        chunk = list(itertools.islice(docs, docs_per_chunk))
        if not chunk:
            break
        ids.extend(tokenizer("\n".join(chunk) + "\n", add_special_tokens=False)["input_ids"])
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.int64)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows (num_windows, seq_len); the incomplete tail is dropped."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def calibration_tokens(
    source: TextSource,
    tokenizer,
    num_sequences: int,
    seq_len: int,
    seed: int,
    max_source_tokens: int | None = None,
) -> torch.Tensor:
    """A seeded random subset of the corpus windows, (num_sequences, seq_len).

    With `max_source_tokens`, only the first that many tokens of the source are read (hub datasets are
    streamed), so a multi-billion-token corpus costs what the calibration set needs, not a full download.
    """
    return calibration_split(source, tokenizer, num_sequences, 0, seq_len, seed, max_source_tokens)[0]


def calibration_split(
    source: TextSource,
    tokenizer,
    num_sequences: int,
    num_validation: int,
    seq_len: int,
    seed: int,
    max_source_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration (num_sequences, seq_len), validation (num_validation, seq_len)) windows of the corpus.

    One seeded permutation of the windows: its first `num_sequences` are the calibration windows (exactly those
    of `calibration_tokens`, whatever `num_validation` is), the next `num_validation` the validation windows;
    both sorted by position in the corpus, and disjoint.
    """
    texts = load_texts(source) if max_source_tokens is None else iter_texts(source, streaming=True)
    all_windows = windows(token_stream(texts, tokenizer, max_tokens=max_source_tokens), seq_len)
    needed = num_sequences + num_validation
    if all_windows.shape[0] < needed:
        read = "" if max_source_tokens is None else f" in its first {max_source_tokens} tokens"
        asked = f"{num_sequences} calibration sequences" + (
            f" + {num_validation} validation sequences" if num_validation else ""
        )
        lower = "data.num_sequences" + (", data.num_validation_sequences" if num_validation else "")
        raise TyrError(
            f"data {source.name!r} has {all_windows.shape[0]} windows of {seq_len} tokens{read}, "
            f"but {asked} were asked for; lower {lower} or data.seq_len"
            + ("" if max_source_tokens is None else ", or raise data.max_source_tokens")
        )
    order = np.random.default_rng(seed).permutation(all_windows.shape[0])
    fit, held_out = np.sort(order[:num_sequences]), np.sort(order[num_sequences:needed])
    return all_windows[torch.from_numpy(fit)].clone(), all_windows[torch.from_numpy(held_out)].clone()


def evaluation_tokens(
    source: TextSource, tokenizer, seq_len: int, num_sequences: int | None = None
) -> torch.Tensor:
    """Consecutive windows from the start of the corpus, (n, seq_len); `num_sequences` None = all."""
    if num_sequences is not None and num_sequences < 1:
        raise TyrError(
            f"the number of evaluation sequences must be >= 1 (or unset: all), got {num_sequences}"
        )
    all_windows = windows(token_stream(load_texts(source), tokenizer), seq_len)
    if all_windows.shape[0] == 0:
        raise TyrError(f"data {source.name!r} is shorter than one sequence of {seq_len} tokens")
    return all_windows[:num_sequences].clone()


# -- token windows kept in the run directory -------------------------------------------------------------------


def save_tokens(path: str | Path, tokens: torch.Tensor) -> None:
    """Write token windows (int64 (N, T)) atomically as safetensors, with their sha256 in the metadata."""
    tokens = tokens.detach().to(torch.int64).contiguous().cpu()
    data = safetensors_bytes({"tokens": tokens}, {"sha256": sha256_tensor(tokens)})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def load_tokens(path: str | Path, shape: tuple[int, int]) -> torch.Tensor | None:
    """Token windows saved by `save_tokens`, or None when the file is missing or damaged (wrong shape or dtype,
    unreadable, or bytes that do not match the stored hash): they are derived data, read again from the source."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("sha256")
            tokens = f.get_tensor("tokens")
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        logger.warning(f"{path} is unreadable ({e}); reading the tokens from the data source again")
        return None
    if tokens.dtype != torch.int64 or tuple(tokens.shape) != tuple(shape) or stored != sha256_tensor(tokens):
        logger.warning(
            f"{path} is damaged (shape {tuple(tokens.shape)} {tokens.dtype}, expected {tuple(shape)} int64, or a "
            "hash mismatch); reading the tokens from the data source again"
        )
        return None
    return tokens
