"""Supernet builder: ladders, expectation weights, byte-identical resume, fingerprint checks."""

from __future__ import annotations

import filecmp
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.tiny import FAMILIES, random_tokens, tiny_model
from tyr.errors import TyrError
from tyr.supernet.builder import BuildPlan, build_supernet, expectation_weights, expected_weight
from tyr.supernet.families import adapter_for
from tyr.supernet.ladder import centre_for_sparsity, make_ladder, step_units
from tyr.supernet.pruner import PrunerOptions
from tyr.supernet.realise import Realiser
from tyr.supernet.store import SupernetStore
from tyr.supernet.variant import Gene, Variant, genes_of


def _plan(adapter, sparsity=0.5, accumulation="expectation", num_levels=5):
    ladders = []
    for gene in genes_of(adapter.num_layers):
        n = adapter.num_units(gene.kind)
        multiple = 1 if gene.kind == "attn" else 4
        step = step_units(n, 0.125, 1, multiple)
        ladders.append(make_ladder(gene, n, centre_for_sparsity(n, sparsity, multiple), step, num_levels))
    return BuildPlan(ladders, accumulation, PrunerOptions(), PrunerOptions(num_rounds=4), batch_size=2)


def _build(directory: Path, model, tokens, plan, fingerprint=None):
    store = SupernetStore.create_or_resume(directory, fingerprint or {"test": 1})
    return store, build_supernet(model, adapter_for(model), tokens, plan, store, progress=False)


def test_ladder_levels_clip_and_steps():
    gene = Gene(0, "mlp")
    ladder = make_ladder(gene, 40, centre_for_sparsity(40, 0.5, 4), 4, 9)
    assert ladder.centre_removed == 20 and ladder.levels == tuple(range(-4, 5))
    edge = make_ladder(gene, 40, 4, 4, 9)
    assert edge.levels == tuple(range(-1, 5)) and edge.removed(-1) == 0
    assert step_units(1536, 0.125, 32, 32) == 192 and step_units(1536, 0.125 / 8, 32, 32) == 32
    assert centre_for_sparsity(9, 0.5) == 5  # rounded up: the budget is never looser than asked


def test_expectation_weights():
    w = expectation_weights([0.25, 0.5, 0.75], "expectation", [-1, 0, 1])
    assert w == pytest.approx([0.5, 1 / 3, 1 / 6])
    assert expectation_weights([0.2, 0.9], "uniform_mean", [0, 1]) == [0.5, 0.5]
    assert expectation_weights([0.2, 0.9], "center", [0, 1]) == [1.0, 0.0]


def test_expected_weight_scatters_columns():
    gene = Gene(0, "attn")
    a = Variant(gene, 0, 0.5, torch.tensor([0, 2]), torch.ones(3, 4), "a")
    b = Variant(gene, 1, 0.75, torch.tensor([1]), 2 * torch.ones(3, 2), "b")
    w = expected_weight([a, b], [0.5, 0.5], (3, 6), 2, torch.float32, torch.device("cpu"))
    assert torch.equal(w[0], torch.tensor([0.5, 0.5, 1.0, 1.0, 0.5, 0.5]))


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2"])
def test_build_writes_every_level_with_exact_costs(tmp_path, family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    plan = _plan(adapter)
    store, report = _build(tmp_path, model, random_tokens(4, 16), plan)
    assert report.genes_built == 2 * adapter.num_layers and report.genes_reused == 0
    reopened = SupernetStore.open(tmp_path)
    for ladder in plan.ladders:
        for level in ladder.levels:
            variant = reopened.variant(ladder.gene, level)
            kept = adapter.num_units(ladder.gene.kind) - ladder.removed(level)
            assert variant.kept.numel() == kept
            gs = adapter.group_size(ladder.gene.kind)
            assert variant.weight.shape == (adapter.hidden_size, kept * gs)
            entry = reopened.level_entry(ladder.gene, level)
            assert entry.params == adapter.module_params(ladder.gene.kind, variant.kept.tolist())


def _files(directory: Path) -> list[Path]:
    return sorted(p.relative_to(directory) for p in directory.rglob("*.safetensors"))


def test_killed_build_resumes_byte_identical(tmp_path, monkeypatch):
    model = tiny_model("llama_gqa")
    tokens = random_tokens(4, 16)
    plan = _plan(adapter_for(model))
    _build(tmp_path / "full", model, tokens, plan)

    original = SupernetStore.write_gene
    calls = {"n": 0}

    def dying_write(self, *args, **kwargs):
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed after three finished genes
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SupernetStore, "write_gene", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "resumed", model, tokens, plan)
    monkeypatch.setattr(SupernetStore, "write_gene", original)
    _, report = _build(tmp_path / "resumed", model, tokens, plan)
    assert report.genes_reused == 3 and report.genes_built == len(plan.ladders) - 3

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert _files(full) == _files(resumed)
    for rel in _files(full):
        assert filecmp.cmp(full / rel, resumed / rel, shallow=False), rel
    assert json.loads((full / "manifest.json").read_text()) == json.loads(
        (resumed / "manifest.json").read_text()
    )


def test_corrupt_variant_is_rebuilt_identically(tmp_path):
    model = tiny_model("llama_mha")
    tokens = random_tokens(4, 16)
    plan = _plan(adapter_for(model))
    store, _ = _build(tmp_path, model, tokens, plan)
    target = tmp_path / "1" / "mlp" / "+1.safetensors"
    good = target.read_bytes()
    target.write_bytes(good[:-8] + b"corrupt!")
    with pytest.raises(TyrError, match="corrupt"):
        SupernetStore.open(tmp_path).variant(Gene(1, "mlp"), 1)
    _, report = _build(tmp_path, model, tokens, plan)
    assert report.genes_built == 1 and target.read_bytes() == good


def test_foreign_supernet_is_refused(tmp_path):
    model = tiny_model("llama_gqa", num_layers=2)
    plan = _plan(adapter_for(model))
    _build(tmp_path, model, random_tokens(2, 8), plan, fingerprint={"calibration": "a"})
    with pytest.raises(TyrError, match="calibration"):
        SupernetStore.create_or_resume(tmp_path, {"calibration": "b"})
    with pytest.raises(TyrError, match="does not belong"):
        SupernetStore.open(tmp_path, {"calibration": "b"})


@pytest.mark.parametrize("mode", ["expectation", "uniform_mean", "center", "none"])
def test_accumulation_modes_differ_only_after_first_block(tmp_path, mode):
    """Block 0 sees the same (embedding) inputs in every mode; later blocks depend on the mode."""
    model = tiny_model("llama_gqa", num_layers=2)
    tokens = random_tokens(4, 16)
    adapter = adapter_for(model)
    _build(tmp_path / mode, model, tokens, _plan(adapter, accumulation=mode))
    _build(tmp_path / "ref", model, tokens, _plan(adapter, accumulation="expectation"))
    first = SupernetStore.open(tmp_path / mode).variant(Gene(0, "attn"), 0)
    ref_first = SupernetStore.open(tmp_path / "ref").variant(Gene(0, "attn"), 0)
    assert torch.equal(first.weight, ref_first.weight)
    last = SupernetStore.open(tmp_path / mode).variant(Gene(1, "mlp"), 0)
    ref_last = SupernetStore.open(tmp_path / "ref").variant(Gene(1, "mlp"), 0)
    assert torch.equal(last.weight, ref_last.weight) == (mode == "expectation")


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_solves_keep_the_same_units(tmp_path, family):
    """supernet.solve_dtype=float32 (the fast path on GPUs with a low float64 rate): the same kept units at
    every level of every gene, and re-fitted weights within 1e-4 (relative) of the float64 ones."""
    model = tiny_model(family, num_layers=2)
    tokens = random_tokens(4, 16)
    plan = _plan(adapter_for(model))
    f32 = PrunerOptions(solve_dtype=torch.float32)
    plan32 = replace(plan, attn_options=f32, mlp_options=replace(plan.mlp_options, solve_dtype=torch.float32))
    _build(tmp_path / "f64", model, tokens, plan)
    _build(tmp_path / "f32", model, tokens, plan32)
    ref, fast = SupernetStore.open(tmp_path / "f64"), SupernetStore.open(tmp_path / "f32")
    for ladder in plan.ladders:
        for level in ladder.levels:
            a, b = ref.variant(ladder.gene, level), fast.variant(ladder.gene, level)
            assert torch.equal(a.kept, b.kept), (ladder.gene.name, level)
            scale = a.weight.double().norm().clamp_min(1e-30)
            assert (a.weight.double() - b.weight.double()).norm() / scale <= 1e-4, (ladder.gene.name, level)


@pytest.mark.parametrize("mode", ["center", "expectation"])
def test_center_accumulation_propagates_exactly_the_uniform_path(tmp_path, monkeypatch, mode):
    """Ground truth for the `center` ablation row: the inputs the builder gives each block are the hidden states
    the uniform structure (every gene at its centre level, realised compactly) computes on the same tokens; with
    `expectation` they are not (a mixture of the variants)."""
    import tyr.supernet.builder as builder

    model = tiny_model("llama_gqa", num_layers=3)
    tokens = random_tokens(4, 16)
    adapter = adapter_for(model)
    seen: dict[str, torch.Tensor] = {}  # gene -> the builder's hidden states entering it
    capture = builder.BuildShard.capture

    def recording(shard, gene):
        hidden = shard.hidden
        seen[gene.name] = torch.cat([hidden.get(i).clone() for i in range(hidden.num_chunks)])
        return capture(shard, gene)

    monkeypatch.setattr(builder.BuildShard, "capture", recording)
    store, _ = _build(tmp_path, model, tokens, _plan(adapter, accumulation=mode))
    realiser = Realiser(model, adapter, "compact")
    genes = genes_of(adapter.num_layers)
    realiser.apply([store.variant(gene, 0) for gene in genes])
    entering: dict[int, torch.Tensor] = {}
    handles = [
        adapter.layer(i).register_forward_pre_hook(
            lambda m, args, kwargs, i=i: entering.__setitem__(
                i, (args[0] if args else kwargs["hidden_states"])
            ),
            with_kwargs=True,
        )
        for i in range(adapter.num_layers)
    ]
    with torch.no_grad():
        model.model(input_ids=tokens, use_cache=False)
    for h in handles:
        h.remove()
    realiser.restore_dense()
    for i in range(adapter.num_layers):
        same = torch.allclose(seen[Gene(i, "attn").name], entering[i], rtol=1e-4, atol=1e-5)
        assert same == (mode == "center" or i == 0), (mode, i)
