"""Realiser: masked and compact genomes compute the same function; dense restore is exact; swaps are minimal."""

from __future__ import annotations

import pytest
import torch

from tests.test_families import biased_llama, tiny_mistral
from tests.tiny import FAMILIES, random_tokens, tiny_model
from tyr.errors import TyrError
from tyr.supernet.families import adapter_for
from tyr.supernet.realise import CompactAttention, Realiser
from tyr.supernet.variant import Variant, genes_of

NUM_LAYERS = 3


def make_variant(adapter, gene, kept, fitted: str = "random", seed: int = 0) -> Variant:
    """kept unit indices; weight = dense output-projection columns of the kept units, or random."""
    kept = torch.tensor(sorted(kept), dtype=torch.long)
    group = adapter.group_size(gene.kind)
    cols = (kept[:, None] * group + torch.arange(group)).reshape(-1)
    dense = adapter.output_proj(gene.layer, gene.kind).weight.detach()
    if fitted == "dense":
        weight = dense[:, cols].clone()
    else:
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(adapter.hidden_size, cols.numel(), generator=g) * 0.15
    sparsity = 1 - kept.numel() / adapter.num_units(gene.kind)
    return Variant(gene, 1, sparsity, kept, weight, key=f"{gene.name}:{kept.tolist()}:{fitted}:{seed}")


def random_genome(adapter, seed: int) -> list[Variant]:
    """Random non-uniform genome with the hard cases forced in: uneven query heads per KV group, a KV head
    with no query head left, a fully pruned attention and a fully pruned MLP."""
    g = torch.Generator().manual_seed(seed)
    group = adapter.num_heads // adapter.num_kv_heads
    genome = []
    for gene in genes_of(adapter.num_layers):
        n = adapter.num_units(gene.kind)
        count = int(torch.randint(1, n + 1, (1,), generator=g))
        kept = torch.randperm(n, generator=g)[:count].tolist()
        if gene.kind == "attn" and gene.layer == 0:
            kept = [0, group, group + 1] if group > 1 else [0, 2, 3]  # uneven per KV group
            kept = [h for h in kept if h < adapter.num_heads]
        if gene.kind == "attn" and gene.layer == 1:
            kept = list(range(group, adapter.num_heads))  # KV head 0 loses every query head
        if gene.kind == "attn" and gene.layer == 2:
            kept = []  # fully pruned attention
        if gene.kind == "mlp" and gene.layer == 1:
            kept = []  # fully pruned MLP
        genome.append(make_variant(adapter, gene, kept, seed=seed * 100 + len(genome)))
    return genome


def dense_genome(adapter) -> list[Variant]:
    return [
        make_variant(adapter, gene, range(adapter.num_units(gene.kind)), fitted="dense")
        for gene in genes_of(adapter.num_layers)
    ]


def logits(model, tokens, **kwargs):
    with torch.no_grad():
        return model(tokens, use_cache=False, **kwargs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_equals_compact(family):
    model = tiny_model(family, num_layers=NUM_LAYERS)
    adapter = adapter_for(model)
    tokens = random_tokens(3, 12)
    dense = logits(model, tokens)
    for seed in (1, 2):
        genome = random_genome(adapter, seed)
        masked = Realiser(model, adapter, mode="masked")
        masked.apply(genome)
        out_masked = logits(model, tokens)
        masked.restore_dense()
        compact = Realiser(model, adapter, mode="compact")
        compact.apply(genome)
        assert isinstance(model.model.layers[0].self_attn, CompactAttention)
        out_compact = logits(model, tokens)
        compact.restore_dense()
        assert torch.isfinite(out_compact).all()
        assert (out_masked - dense).abs().max() > 1e-2  # the genome really changes the model
        torch.testing.assert_close(out_compact, out_masked, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits(model, tokens), dense)


@pytest.mark.parametrize("family", ["qwen2", "llama_bias", "mistral"])
def test_masked_equals_compact_padding_and_eager(family):
    """With a padding mask (sdpa gets a 4-D bool mask) and with eager attention (4-D float mask); biased o/down."""
    model = {"qwen2": lambda: tiny_model("qwen2", num_layers=NUM_LAYERS), "llama_bias": biased_llama}.get(
        family, tiny_mistral
    )()
    adapter = adapter_for(model)
    tokens = random_tokens(2, 10)
    mask = torch.ones_like(tokens)
    mask[0, 7:] = 0  # right padding: no fully masked query row
    genome = random_genome(adapter, 3)
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        outs = []
        for mode in ("masked", "compact"):
            realiser = Realiser(model, adapter, mode=mode)
            realiser.apply(genome)
            outs.append(logits(model, tokens, attention_mask=mask))
            realiser.restore_dense()
        torch.testing.assert_close(outs[1][mask.bool()], outs[0][mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["masked", "compact"])
@pytest.mark.parametrize("family", ["llama_gqa", "qwen3"])
def test_dense_variants_and_restore(family, mode):
    model = tiny_model(family, num_layers=NUM_LAYERS)
    adapter = adapter_for(model)
    tokens = random_tokens()
    dense = logits(model, tokens)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dense_modules = [
        (layer.self_attn, layer.mlp.gate_proj, layer.mlp.down_proj) for layer in model.model.layers
    ]

    realiser = Realiser(model, adapter, mode=mode)
    realiser.apply(dense_genome(adapter))
    torch.testing.assert_close(logits(model, tokens), dense, atol=1e-6, rtol=1e-6)

    realiser.apply(random_genome(adapter, 4))
    realiser.restore_dense()
    assert torch.equal(logits(model, tokens), dense)
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert [
        (layer.self_attn, layer.mlp.gate_proj, layer.mlp.down_proj) for layer in model.model.layers
    ] == dense_modules
    assert realiser.keys == [None] * 2 * NUM_LAYERS


def _block_trace(mode, attn_kept, mlp_kept):
    """Prune layer 1 of a fresh 2-layer llama and record its input, output and the two module contributions."""
    model = tiny_model("llama_gqa", num_layers=2)
    adapter = adapter_for(model)
    genes = genes_of(2)
    genome = [
        None,
        None,
        make_variant(adapter, genes[2], attn_kept),
        make_variant(adapter, genes[3], mlp_kept),
    ]
    Realiser(model, adapter, mode=mode).apply(genome)
    layer, seen = model.model.layers[1], {}
    layer.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=args[0], y=out), with_kwargs=True)
    layer.self_attn.register_forward_hook(lambda m, args, out: seen.update(attn=out[0]))
    layer.mlp.register_forward_hook(lambda m, args, out: seen.update(mlp_in=args[0], mlp=out))
    logits(model, random_tokens(2, 9))
    return layer, seen


@pytest.mark.parametrize("mode", ["masked", "compact"])
def test_fully_pruned_modules_are_no_ops(mode):
    """A fully pruned module (no bias) adds nothing: block output == input + the other module's contribution."""
    layer, seen = _block_trace(mode, [], range(40))
    assert torch.equal(seen["attn"], torch.zeros_like(seen["attn"]))
    torch.testing.assert_close(seen["mlp_in"], layer.post_attention_layernorm(seen["x"]), atol=0, rtol=0)
    torch.testing.assert_close(seen["y"], seen["x"] + seen["mlp"], atol=1e-6, rtol=0)

    layer, seen = _block_trace(mode, [1, 4], [])
    assert torch.equal(seen["mlp"], torch.zeros_like(seen["mlp"]))
    assert seen["attn"].abs().max() > 1e-3
    torch.testing.assert_close(seen["y"], seen["x"] + seen["attn"], atol=1e-6, rtol=0)


def test_fully_pruned_with_bias_returns_bias():
    model = biased_llama()
    adapter = adapter_for(model)
    genes = genes_of(2)
    genome = [make_variant(adapter, genes[0], []), make_variant(adapter, genes[1], []), None, None]
    Realiser(model, adapter, mode="compact").apply(genome)
    layer = model.model.layers[0]
    out = {}
    layer.self_attn.register_forward_hook(lambda m, args, o: out.update(attn=o[0]))
    layer.mlp.register_forward_hook(lambda m, args, o: out.update(mlp=o))
    result = logits(model, random_tokens(2, 5))
    assert torch.isfinite(result).all()
    assert out["attn"].shape == out["mlp"].shape == (2, 5, 48)
    assert torch.equal(out["attn"], layer.self_attn.o_proj.bias.expand(2, 5, 48))
    assert torch.equal(out["mlp"], layer.mlp.down_proj.bias.expand(2, 5, 48))


@pytest.mark.parametrize("mode", ["masked", "compact"])
def test_swaps_only_changed_genes(mode):
    model = tiny_model("qwen2", num_layers=NUM_LAYERS)
    adapter = adapter_for(model)
    tokens = random_tokens(2, 8)
    realiser = Realiser(model, adapter, mode=mode)
    a, b = random_genome(adapter, 5), random_genome(adapter, 6)
    assert realiser.apply(a) == 6 and realiser.swaps == 6
    out_a = logits(model, tokens)
    assert realiser.apply(list(a)) == 0 and realiser.swaps == 6
    c = list(a)
    c[3] = b[3]
    assert realiser.apply(c) == 1 and realiser.swaps == 7
    c[4] = None
    assert realiser.apply(c) == 1 and realiser.swaps == 8
    assert realiser.apply(b) == 5  # gene 3 already holds b's variant
    assert realiser.apply(a) == 6  # back to a: re-sliced from the dense originals
    assert torch.equal(logits(model, tokens), out_a)
    realiser.restore_dense()
    assert realiser.swaps == 19 + 6


def test_compact_dtype_and_errors():
    model = tiny_model("qwen3", num_layers=2).to(torch.bfloat16)
    adapter = adapter_for(model)
    genes = genes_of(2)
    genome = [
        make_variant(adapter, gene, [0, 3] if gene.kind == "attn" else range(0, 40, 3)) for gene in genes
    ]
    realiser = Realiser(model, adapter, mode="compact")
    realiser.apply(genome)  # variant weights are fp32: cast to the module's dtype
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(logits(model, random_tokens(2, 6))).all()
    with pytest.raises(TyrError, match="use_cache=False"):
        model(random_tokens(1, 4))  # HF defaults to use_cache=True
    with pytest.raises(TyrError, match="genes"):
        realiser.apply(genome[:3])
    with pytest.raises(TyrError, match="out of order"):
        realiser.apply([genome[1], genome[0], *genome[2:]])
    bad = Variant(genes[0], 0, 0.0, torch.tensor([1, 2]), torch.zeros(48, 8), key="bad")
    with pytest.raises(TyrError, match="shape"):
        realiser.apply([bad, *genome[1:]])
    unsorted = Variant(genes[0], 0, 0.0, torch.tensor([2, 1]), torch.zeros(48, 16), key="unsorted")
    with pytest.raises(TyrError, match="sorted"):
        realiser.apply([unsorted, *genome[1:]])
    with pytest.raises(TyrError, match="mode"):
        Realiser(model, adapter, mode="sliced")
