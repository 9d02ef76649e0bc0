"""Evaluators: teacher top-K targets, sparse KL fitness, perplexity."""

from __future__ import annotations

import ast
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import FAMILIES, random_tokens, tiny_model
from tyr.errors import TyrError
from tyr.evaluators.kl import (
    full_kl,
    kl_mean,
    logits_at_indices,
    sparse_kl,
    sparse_kl_from_logits,
    sparse_kl_sums,
    sparse_kl_targets,
)
from tyr.evaluators.perplexity import nll_sum_and_count, perplexity
from tyr.evaluators.teacher import (
    TeacherTargets,
    compute_and_save_teacher_targets,
    compute_teacher_targets,
    save_teacher_targets,
)

VOCAB = 101


def perturbed(model, scale: float = 0.05, seed: int = 1):
    student = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return student


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama_gqa", num_layers=2, seed=0)


@pytest.fixture(scope="module")
def student(teacher):
    return perturbed(teacher)


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(5, 12, VOCAB, seed=3)


def full_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def naive_sparse_kl(student, tokens, values, indices):
    s = full_logits(student, tokens).gather(-1, indices.long())
    return sparse_kl_from_logits(s, values).mean().item()


# ------------------------------------------------------------------------------------------ sparse KL
def test_sparse_kl_equals_full_kl_when_k_is_vocab(teacher, student, tokens):
    t_logits = full_logits(teacher, tokens)
    values, indices = torch.topk(t_logits, VOCAB, dim=-1)
    ref = full_kl(student, tokens, t_logits)
    assert ref > 1e-3
    got = sparse_kl(student, tokens, values, indices, batch_size=2)
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-7)
    # Stored (fp16) targets give the same answer up to fp16 rounding of the teacher logits.
    v16, i32 = compute_teacher_targets(teacher, tokens, VOCAB)
    assert sparse_kl(student, tokens, v16, i32) == pytest.approx(ref, rel=1e-2)


def test_sparse_kl_zero_for_teacher(teacher, tokens):
    values, indices = compute_teacher_targets(teacher, tokens, 16)
    assert abs(sparse_kl(teacher, tokens, values, indices)) < 1e-5
    t_logits = full_logits(teacher, tokens)
    v32, i = torch.topk(t_logits, 16, dim=-1)
    assert abs(sparse_kl(teacher, tokens, v32, i)) < 1e-6


def test_per_sequence_sums_are_the_work_units_of_the_mean(teacher, student, tokens):
    """sparse_kl_sums: one float64 sum per sequence (the per-token KL summed over its positions); a block of
    sequences gives the same bits alone as inside the whole batch (same forwards), and the mean is their
    float64 sum in sequence order over the tokens."""
    values, indices = compute_teacher_targets(teacher, tokens, 7)
    sums = sparse_kl_sums(
        student, tokens, values, indices, batch_size=2
    )  # (5,): forwards [0:2], [2:4], [4:5]
    assert sums.dtype == torch.float64 and sums.shape == (tokens.shape[0],)
    per_token = sparse_kl_from_logits(
        full_logits(student, tokens).gather(-1, indices.long()), values
    )  # (5, T)
    torch.testing.assert_close(sums, per_token.sum(dim=1).double(), rtol=1e-5, atol=1e-7)
    for start, stop in ((0, 2), (2, 4), (4, 5)):
        alone = sparse_kl_sums(
            student, tokens[start:stop], values[start:stop], indices[start:stop], batch_size=2
        )
        assert torch.equal(alone, sums[start:stop])
    total = 0.0
    for v in sums.tolist():
        total += v
    assert sparse_kl(student, tokens, values, indices, batch_size=2) == total / tokens.numel()
    assert kl_mean(sums.tolist(), tokens.shape[1]) == total / tokens.numel()
    assert kl_mean([1.0, 2.0, 4.0], num_positions=2) == 7.0 / 6
    with pytest.raises(TyrError):
        kl_mean([], num_positions=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_union_trick_matches_naive_gather(family):
    teacher = tiny_model(family, num_layers=1, seed=0)
    student = perturbed(teacher, seed=2)
    tokens = random_tokens(3, 10, VOCAB, seed=4)
    values, indices = compute_teacher_targets(teacher, tokens, 7, batch_size=2)
    ref = naive_sparse_kl(student, tokens, values, indices)
    assert ref > 0
    for bs in (1, 2, 3):
        assert sparse_kl(student, tokens, values, indices, batch_size=bs) == pytest.approx(ref, rel=1e-5)
    # Tiny budgets force the per-chunk union and the full-projection fallback.
    for method in ("auto", "union", "full", "direct"):
        for budget in (1, 50, 10_000):
            got = sparse_kl(student, tokens, values, indices, logit_budget=budget, method=method)
            assert got == pytest.approx(ref, rel=1e-5)


def test_union_trick_tied_embeddings_and_bias():
    torch.manual_seed(0)
    model = tiny_model("qwen2", num_layers=1, seed=5)
    # Tied: lm_head shares the embedding matrix.
    model.lm_head.weight = model.model.embed_tokens.weight
    tokens = random_tokens(2, 9, VOCAB, seed=6)
    teacher = perturbed(model, seed=7)
    values, indices = compute_teacher_targets(teacher, tokens, 11)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for method in ("union", "direct"):
        assert sparse_kl(model, tokens, values, indices, method=method) == pytest.approx(
            naive_sparse_kl(model, tokens, values, indices), rel=1e-5
        )
    # An output projection with a bias.
    head = torch.nn.Linear(48, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.model.embed_tokens.weight)
        head.bias.normal_(0, 0.5)
    model.lm_head = head
    for method in ("union", "direct"):
        assert sparse_kl(model, tokens, values, indices, method=method) == pytest.approx(
            naive_sparse_kl(model, tokens, values, indices), rel=1e-5
        )


@torch.no_grad()
def test_logits_at_indices_all_methods():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=True)
    h = torch.randn(13, 8, generator=g)
    idx = torch.randint(0, 30, (13, 5), generator=g)
    ref = head(h).gather(1, idx).detach()
    for method in ("auto", "union", "full", "direct"):
        for budget in (1, 7, 1 << 20):
            torch.testing.assert_close(logits_at_indices(h, head, idx, budget, method=method), ref)
    head.bias = None
    torch.testing.assert_close(
        logits_at_indices(h, head, idx, method="direct"), (h @ head.weight.T).gather(1, idx)
    )


def test_sparse_kl_from_logits_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, 9, generator=g)
    assert sparse_kl_from_logits(a, a).abs().max() < 1e-6
    # Invariant to a per-token shift of either side (renormalised over K).
    b = torch.randn(4, 6, 9, generator=g)
    kl = sparse_kl_from_logits(b, a)
    assert kl.shape == (4, 6) and kl.dtype == torch.float32 and (kl >= 0).all()
    torch.testing.assert_close(sparse_kl_from_logits(b + 3.0, a - 1.0), kl, atol=1e-5, rtol=1e-5)


def test_sparse_kl_rejects_mismatched_targets(student, tokens):
    values, indices = compute_teacher_targets(student, tokens, 4)
    with pytest.raises(TyrError):
        sparse_kl(student, tokens[:, :-1], values, indices)
    with pytest.raises(TyrError):
        sparse_kl(student, tokens, values, indices + VOCAB)


# ---------------------------------------------------------------------------------- teacher targets
def test_teacher_values_are_true_topk(teacher, tokens):
    k = 9
    values, indices = compute_teacher_targets(teacher, tokens, k, batch_size=2)
    assert values.dtype == torch.float16 and indices.dtype == torch.int32
    assert values.shape == indices.shape == (*tokens.shape, k)
    logits = full_logits(teacher, tokens)
    ref_values, _ = torch.topk(logits, k, dim=-1)
    torch.testing.assert_close(values.float(), ref_values, atol=1e-2, rtol=1e-3)
    # Stored indices point at those logits (robust to ties), in descending order.
    torch.testing.assert_close(logits.gather(-1, indices.long()), ref_values, atol=1e-5, rtol=1e-5)
    assert (values[..., :-1] >= values[..., 1:]).all()
    with pytest.raises(TyrError):
        compute_teacher_targets(teacher, tokens, VOCAB + 1)


def test_teacher_targets_round_trip(teacher, tokens, tmp_path):
    k = 5
    directory = tmp_path / "targets"
    targets = compute_and_save_teacher_targets(
        teacher, tokens, k, directory, batch_size=2, meta={"note": "x"}
    )
    values, indices = compute_teacher_targets(teacher, tokens, k)
    assert (targets.num_sequences, targets.seq_len, targets.k) == (*tokens.shape, k)
    assert targets.meta["k"] == k and targets.meta["shape"] == [*tokens.shape, k]
    assert targets.meta["note"] == "x" and len(targets.meta["tokens_sha256"]) == 64
    assert targets.meta["vocab_size"] == VOCAB
    for rows in ([0, 1, 2, 3, 4], [3, 1, 2, 2, 0], [4], [2, 3, 0, 1], []):
        v, i = targets.get(rows)
        assert v.shape == (len(rows), tokens.shape[1], k)
        assert torch.equal(v, values[rows]) and torch.equal(i, indices[rows])
    with pytest.raises(IndexError):
        targets.get([5])
    targets.check_tokens(tokens)
    with pytest.raises(TyrError):
        targets.check_tokens((tokens + 1) % VOCAB)
    reopened = TeacherTargets.open(directory, verify=True)
    assert torch.equal(reopened.get([1])[0], values[[1]])
    assert sparse_kl_targets(teacher, tokens, reopened, [4, 0, 2], batch_size=2) == pytest.approx(
        sparse_kl(teacher, tokens[[4, 0, 2]], values[[4, 0, 2]], indices[[4, 0, 2]]), rel=1e-6, abs=1e-9
    )
    assert sorted(p.name for p in directory.iterdir()) == ["meta.json", "targets.safetensors"]


def test_a_prefix_reads_and_scores_only_its_positions(teacher, student, tokens, tmp_path):
    """get(rows, P) reads the first P positions only; the KL of a prefix is the mean over its positions of
    the per-position KL of the whole sequences (causal attention: a position never sees what follows)."""
    k, p, rows = 6, 5, [3, 0, 1]
    targets = compute_and_save_teacher_targets(teacher, tokens, k, tmp_path / "t", batch_size=2)
    values, indices = compute_teacher_targets(teacher, tokens, k)
    before = targets.bytes_read
    v, i = targets.get(rows, p)
    assert torch.equal(v, values[rows, :p]) and torch.equal(i, indices[rows, :p])
    assert targets.bytes_read - before == len(rows) * p * k * (2 + 4)  # fp16 values + int32 indices
    with pytest.raises(IndexError):
        targets.get(rows, tokens.shape[1] + 1)
    per_position = sparse_kl_from_logits(
        full_logits(student, tokens[rows]).gather(-1, indices[rows].long()), values[rows]
    )  # (3, T) from the whole sequences
    got = sparse_kl_targets(student, tokens, targets, rows, batch_size=2, num_positions=p)
    assert got == pytest.approx(per_position[:, :p].mean().item(), rel=1e-5)
    whole = sparse_kl_targets(student, tokens, targets, rows, batch_size=2)
    assert whole == pytest.approx(per_position.mean().item(), rel=1e-5) and whole != got


def test_teacher_targets_open_errors(tmp_path):
    with pytest.raises(TyrError, match="does not exist"):
        TeacherTargets.open(tmp_path / "missing")
    n, t, k = 3, 4, 2
    values = torch.randn(n, t, k).sort(dim=-1, descending=True).values
    indices = torch.randint(0, 50, (n, t, k))
    good = tmp_path / "good"
    save_teacher_targets(good, values, indices, {"tokens_sha256": "0" * 64})
    assert TeacherTargets.open(good).get([2, 0])[0].shape == (2, t, k)

    def broken(name, mutate) -> Path:
        d = tmp_path / name
        save_teacher_targets(d, values, indices, {})
        mutate(d)
        return d

    def truncate(d):
        f = d / "targets.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) - 10])

    def header_garbage(d):
        (d / "targets.safetensors").write_bytes(b"\xff" * 5)

    def drop_meta(d):
        (d / "meta.json").unlink()

    def drop_file(d):
        (d / "targets.safetensors").unlink()

    def bad_json(d):
        (d / "meta.json").write_text("{not json")

    def wrong_shape(d):
        meta = json.loads((d / "meta.json").read_text())
        meta["shape"] = [n, t, k + 1]
        (d / "meta.json").write_text(json.dumps(meta))

    for name, mutate in [
        ("trunc", truncate),
        ("garbage", header_garbage),
        ("nometa", drop_meta),
        ("nofile", drop_file),
        ("badjson", bad_json),
        ("shape", wrong_shape),
    ]:
        with pytest.raises(TyrError):
            TeacherTargets.open(broken(name, mutate))


# ----------------------------------------------------------------------------------------- perplexity
def test_perplexity_matches_cross_entropy(student, tokens):
    logits = full_logits(student, tokens)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    ref = math.exp(ce.item())
    for bs in (1, 2, 4, 16):
        assert perplexity(student, tokens, batch_size=bs) == pytest.approx(ref, rel=1e-5)
    total, count = nll_sum_and_count(student, tokens, logit_budget=VOCAB * 3)
    assert count == tokens.shape[0] * (tokens.shape[1] - 1)
    assert math.exp(total / count) == pytest.approx(ref, rel=1e-5)
    with pytest.raises(TyrError):
        perplexity(student, tokens[:, :1])
    with pytest.raises(TyrError):
        perplexity(student, tokens + VOCAB)


# ------------------------------------------------------------------------------------------- layering
def test_evaluators_do_not_import_search():
    root = Path(__file__).resolve().parents[1] / "evaluators"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] != "search", f"{path.name} imports {name}"


def test_streamed_targets_equal_the_in_memory_ones_byte_for_byte(tmp_path):
    from tests.tiny import random_tokens, tiny_model
    from tyr.evaluators.teacher import (
        compute_and_save_teacher_targets,
        compute_teacher_targets,
        save_teacher_targets,
    )

    model = tiny_model("llama_gqa", num_layers=2)
    tokens = random_tokens(5, 9)
    streamed = compute_and_save_teacher_targets(model, tokens, 7, tmp_path / "streamed", batch_size=2)
    values, indices = compute_teacher_targets(model, tokens, 7, batch_size=3)
    save_teacher_targets(tmp_path / "memory", values, indices, dict(streamed.meta))
    for name in ("targets.safetensors", "meta.json"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "memory" / name).read_bytes()
    got_v, got_i = streamed.get([4, 0, 1])
    assert torch.equal(got_v, values[[4, 0, 1]]) and torch.equal(got_i, indices[[4, 0, 1]])
    assert not list((tmp_path / "streamed").glob(".*tmp"))  # no temporary file left behind


def test_blocked_file_digest_is_the_digest_of_block_digests_and_catches_any_change(tmp_path):
    """tyr.io.blocked_sha256_file (teacher targets, hidden states): sha256 over the blocks' sha256 digests, in
    order, whatever the thread count; one changed, added or removed byte changes it; older plain digests still
    verify."""
    import hashlib

    from tyr.io import blocked_sha256_file, file_digest_matches, sha256_file

    path = tmp_path / "data.bin"
    data = bytes(range(256)) * 14  # 3584 bytes: three full 1000-byte blocks and a short one
    path.write_bytes(data)
    blocks = [hashlib.sha256(data[i : i + 1000]).digest() for i in range(0, len(data), 1000)]
    want = f"sha256-blocks-1000:{hashlib.sha256(b''.join(blocks)).hexdigest()}"
    assert blocked_sha256_file(path, 1000, threads=1) == blocked_sha256_file(path, 1000, threads=3) == want
    assert file_digest_matches(path, want) and file_digest_matches(path, sha256_file(path))
    for changed in (data[:1500] + b"\x00" + data[1501:], data + b"\x00", data[:-1]):
        path.write_bytes(changed)
        assert not file_digest_matches(path, want)
    path.write_bytes(b"")
    assert (
        blocked_sha256_file(path, 1000)
        == f"sha256-blocks-1000:{hashlib.sha256(hashlib.sha256(b'').digest()).hexdigest()}"
    )
