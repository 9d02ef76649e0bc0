"""ModelAdapter: family detection, structure, and exact parameter counts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig

from tests.tiny import FAMILIES, tiny_config, tiny_model
from tyr.errors import TyrError
from tyr.supernet.families import FAMILIES as FAMILY_TABLE
from tyr.supernet.families import adapter_for, find_rotary
from tyr.supernet.realise import CompactAttention, Realiser
from tyr.supernet.variant import Variant, genes_of

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def biased_llama():
    """Llama with attention_bias and mlp_bias: every projection (o_proj and down_proj included) has a bias."""
    config = tiny_config("llama_gqa", num_layers=2)
    config.attention_bias = True
    config.mlp_bias = True
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_mistral():
    config = MistralConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    torch.manual_seed(2)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def all_models():
    yield from ((f, tiny_model(f, num_layers=2)) for f in FAMILIES)
    yield "llama_bias", biased_llama()
    yield "mistral", tiny_mistral()


def proj_numel(module, names=PROJ) -> int:
    return sum(p.numel() for n in names if hasattr(module, n) for p in getattr(module, n).parameters())


def variant(adapter, layer, kind, kept) -> Variant:
    kept = torch.tensor(sorted(kept), dtype=torch.long)
    width = kept.numel() * adapter.group_size(kind)
    gene = genes_of(adapter.num_layers)[2 * layer + (kind == "mlp")]
    return Variant(gene, 0, 0.0, kept, torch.randn(adapter.hidden_size, width), key=f"{kind}{kept.tolist()}")


@pytest.mark.parametrize("family", FAMILIES)
def test_structure(family):
    model = tiny_model(family, num_layers=2)
    a = adapter_for(model)
    kv = {"llama_mha": 6, "llama_gqa": 2, "qwen2": 3, "qwen3": 2}[family]
    assert (a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.intermediate_size) == (
        2,
        48,
        6,
        kv,
        8,
        40,
    )
    assert a.model_type == family.split("_")[0]
    assert a.layer(1) is model.model.layers[1]
    assert a.num_units("attn") == 6 and a.num_units("mlp") == 40
    assert a.group_size("attn") == 8 and a.group_size("mlp") == 1
    assert a.output_proj(1, "attn") is model.model.layers[1].self_attn.o_proj
    assert a.output_proj(0, "mlp") is model.model.layers[0].mlp.down_proj
    group = 6 // kv
    assert [a.kv_head_of(h) for h in range(6)] == [h // group for h in range(6)]
    assert a.kept_kv_heads([]) == []
    assert a.kept_kv_heads(range(6)) == list(range(kv))
    assert a.kept_kv_heads(torch.tensor([5])) == [5 // group]
    assert callable(a.rotary_fn())


def test_family_table_covers_supported():
    assert set(FAMILY_TABLE) == {"llama", "mistral", "qwen2", "qwen3"}


def test_counts_equal_compact_numel():
    """attention_params / mlp_params == sum(numel) of the compact modules, for many kept sets and families."""
    g = torch.Generator().manual_seed(0)
    for family, model in all_models():
        a = adapter_for(model)
        group = a.num_heads // a.num_kv_heads
        head_sets = [
            [],
            list(range(a.num_heads)),
            [0],
            list(range(group, a.num_heads)),
        ]  # last: KV head 0 gone
        head_sets += [
            sorted(torch.randperm(6, generator=g)[: int(n)].tolist())
            for n in torch.randint(0, 7, (6,), generator=g)
        ]
        chan_sets = [[], list(range(a.intermediate_size)), [7]]
        chan_sets += [
            sorted(torch.randperm(40, generator=g)[: int(n)].tolist())
            for n in torch.randint(0, 41, (4,), generator=g)
        ]
        realiser = Realiser(model, a, mode="compact")
        genes = genes_of(a.num_layers)
        for heads in head_sets:
            genome = [None] * len(genes)
            genome[0] = variant(a, 0, "attn", heads)
            realiser.apply(genome)
            attn = model.model.layers[0].self_attn
            assert isinstance(attn, CompactAttention)
            assert proj_numel(attn) == a.attention_params(heads) == a.module_params("attn", heads), (
                family,
                heads,
            )
            # k/v keep exactly the KV heads still used by a query head
            assert attn.k_proj.out_features == len(a.kept_kv_heads(heads)) * a.head_dim
        for chans in chan_sets:
            genome = [None] * len(genes)
            genome[1] = variant(a, 0, "mlp", chans)
            realiser.apply(genome)
            mlp = model.model.layers[0].mlp
            assert proj_numel(mlp) == a.mlp_params(len(chans)) == a.module_params("mlp", chans), (
                family,
                chans,
            )
        realiser.restore_dense()


def test_dense_counts():
    for family, model in all_models():
        a = adapter_for(model)
        counted = sum(p.numel() for n, p in model.named_parameters() if any(f".{k}." in n for k in PROJ))
        assert a.dense_prunable_params() == counted, family
        layer = model.model.layers[0]
        assert a.dense_module_params("attn") == proj_numel(layer.self_attn), family
        assert a.dense_module_params("mlp") == proj_numel(layer.mlp), family
        # o_proj bias survives a fully pruned attention; down_proj bias a fully pruned MLP
        assert a.attention_params([]) == (a.hidden_size if family == "llama_bias" else 0)
        assert a.mlp_params(0) == (a.hidden_size if family == "llama_bias" else 0)


def test_find_rotary():
    model = tiny_model("qwen3", num_layers=1)
    rotary = find_rotary(model)
    assert rotary is model.model.rotary_emb
    cos, sin = rotary(torch.zeros(1, 5, 48), torch.arange(5)[None])
    assert cos.shape == sin.shape == (1, 5, 8)


def test_unsupported_architecture():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(TyrError) as err:
        adapter_for(gpt2)
    message = str(err.value)
    assert "gpt2" in message
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        assert name in message
    with pytest.raises(TyrError):
        find_rotary(gpt2)


def test_rejects_already_pruned_model():
    model = tiny_model("llama_gqa", num_layers=2)
    Realiser(model, mode="compact").apply(
        [variant(adapter_for(model), 0, "attn", [0, 1])] + [None] * 3
    )  # layer 0 attention is now a CompactAttention
    with pytest.raises(TyrError):
        adapter_for(model)
    model = tiny_model("llama_gqa", num_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj = torch.nn.Linear(48, 30, bias=False)
    with pytest.raises(TyrError, match="up_proj"):
        adapter_for(model)
