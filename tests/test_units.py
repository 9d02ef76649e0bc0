"""The pruning-unit type: coupled slices of a head / channel, against slices written out by hand."""

from __future__ import annotations

import torch

from tests.tiny import tiny_model
from tyr.supernet.families import adapter_for
from tyr.supernet.units import UnitLayout, unit_rows


def test_unit_rows_keeps_unit_order():
    assert unit_rows(torch.tensor([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]
    assert unit_rows(torch.tensor([], dtype=torch.int64), 4).tolist() == []


def test_attention_slices_follow_kv_groups():
    units = UnitLayout.attention(
        num_heads=6, num_kv_heads=2, head_dim=2
    )  # KV head 0: q 0-2, KV head 1: q 3-5
    kept = [1, 2, 5]
    assert units.kept_kv_heads(kept) == [0, 1]
    assert units.kv_index(kept) == [0, 0, 1]
    s = units.slices(kept)
    assert s["q_proj"][0] == 0 and s["q_proj"][1].tolist() == [2, 3, 4, 5, 10, 11]
    assert s["o_proj"][0] == 1 and s["o_proj"][1].tolist() == [2, 3, 4, 5, 10, 11]
    assert s["k_proj"][1].tolist() == s["v_proj"][1].tolist() == [0, 1, 2, 3]
    # KV head 0 empties when its three query heads go: its k/v rows go with it
    assert units.kept_kv_heads([4]) == [1] and units.kv_rows([4]).tolist() == [2, 3]
    dropped = units.dropped_rows([4])
    assert dropped["k_proj"].tolist() == [0, 1] and dropped["q_proj"].tolist() == [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        10,
        11,
    ]
    assert "o_proj" not in dropped  # output projections lose columns, not rows


def test_mlp_slices():
    units = UnitLayout.mlp(5)
    s = units.slices([0, 3])
    assert {n: (d, i.tolist()) for n, (d, i) in s.items()} == {
        "gate_proj": (0, [0, 3]),
        "up_proj": (0, [0, 3]),
        "down_proj": (1, [0, 3]),
    }
    assert units.dropped_rows([0, 3])["up_proj"].tolist() == [1, 2, 4]


def test_params_equal_the_sliced_tensors():
    """Slicing a real layer with `slices` leaves exactly `params` parameters (biases on, GQA 3 x 2)."""
    model = tiny_model("qwen2")  # q/k/v biases, 6 heads on 3 KV heads
    adapter = adapter_for(model)
    layer = adapter.layer(0)
    for kind, module, kept in (("attn", layer.self_attn, [0, 1, 4]), ("mlp", layer.mlp, [1, 2, 3, 39])):
        units = adapter.units(kind)
        total = 0
        for name, (dim, idx) in units.slices(kept).items():
            lin = getattr(module, name)
            total += lin.weight.index_select(dim, idx).numel()
            if lin.bias is not None:
                total += lin.bias.index_select(0, idx).numel() if dim == 0 else lin.bias.numel()
        assert total == adapter.module_params(kind, kept)
