"""Calibration data: capped reads of a source, and hub datasets streamed when capped."""

from __future__ import annotations

import datasets
import pytest
import torch

from tests.tiny import char_tokenizer, write_corpus
from tyr.config import resolve_config
from tyr.data import TextSource, calibration_tokens, load_texts, looks_like_path, token_stream, windows
from tyr.errors import TyrError


def test_capped_token_stream_is_a_prefix_of_the_full_stream(tmp_path):
    source = TextSource(str(write_corpus(tmp_path / "c.txt", num_docs=40, seed=0)))
    tok = char_tokenizer()
    full = token_stream(load_texts(source), tok, docs_per_chunk=3)
    capped = token_stream(iter(load_texts(source)), tok, docs_per_chunk=3, max_tokens=500)
    assert capped.numel() == 500 and torch.equal(capped, full[:500])
    assert torch.equal(token_stream(load_texts(source), tok), full)  # chunking does not change the tokens


def test_calibration_windows_come_from_the_capped_prefix(tmp_path):
    source = TextSource(str(write_corpus(tmp_path / "c.txt", num_docs=40, seed=0)))
    tok = char_tokenizer()
    tokens = calibration_tokens(source, tok, 4, 32, seed=0, max_source_tokens=8 * 32)
    prefix = windows(token_stream(load_texts(source), tok)[: 8 * 32], 32)
    assert all(any(torch.equal(row, w) for w in prefix) for row in tokens)
    with pytest.raises(TyrError, match="max_source_tokens"):
        calibration_tokens(source, tok, 9, 32, seed=0, max_source_tokens=8 * 32)


def test_hub_dataset_is_streamed_when_capped(monkeypatch):
    calls = []

    def rows():
        for i in range(1000):
            yield {"text": f"document number {i} " * 5}

    def fake_load_dataset(name, config=None, split=None, streaming=False, **kwargs):
        calls.append((name, config, split, streaming))
        assert streaming, "a capped hub source must be streamed"
        return datasets.IterableDataset.from_generator(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = TextSource("org/huge-corpus", "sample", "train")
    tokens = calibration_tokens(source, char_tokenizer(), 4, 16, seed=0, max_source_tokens=256)
    assert tokens.shape == (4, 16) and calls == [("org/huge-corpus", "sample", "train", True)]
    with pytest.raises(TyrError, match="no column 'body'"):
        calibration_tokens(TextSource("org/huge-corpus", text_field="body"), char_tokenizer(), 4, 16, 0, 256)


def test_cap_below_the_calibration_set_is_refused():
    with pytest.raises(TyrError, match="max_source_tokens"):
        resolve_config(None, ["data.num_sequences=4", "data.seq_len=32", "data.max_source_tokens=100"])


@pytest.mark.parametrize(
    "name, local",
    [
        ("nope.txt", True),
        ("data/nope.txt", True),
        ("shards/part.PARQUET", True),
        ("./corpus", True),
        ("~/corpus", True),
        ("/data/corpus", True),
        ("a/b/c", True),
        ("wikitext", False),
        ("Salesforce/wikitext", False),
        ("HuggingFaceFW/fineweb-edu", False),
        ("allenai/c4", False),
    ],
)
def test_missing_local_paths_are_not_taken_for_hub_names(name, local):
    assert looks_like_path(name) == local
