"""Every shipped config loads and validates offline; the paper configs hold the paper's setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from tyr.config import identity_dict, resolve_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PAPER = {
    "llama31-8b-50.yaml": "meta-llama/Llama-3.1-8B",
    "llama31-8b-50-ray.yaml": "meta-llama/Llama-3.1-8B",
    "llama31-70b-50.yaml": "meta-llama/Llama-3.1-70B",
    "qwen25-7b-50.yaml": "Qwen/Qwen2.5-7B",
    "mistral-7b-50.yaml": "mistralai/Mistral-7B-v0.3",
}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_loads_and_validates(path):
    cfg = resolve_config(str(path), [])  # no model or data is touched
    cfg.validate()


def test_every_paper_config_is_shipped():
    assert set(PAPER) <= {p.name for p in CONFIGS.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_setting(name):
    cfg = resolve_config(str(CONFIGS / name), [])
    assert cfg.model.name == PAPER[name] and cfg.model.dtype == "bfloat16" and cfg.model.device == "auto"
    assert cfg.schedule == "paper" and cfg.sparsity == 0.5
    assert cfg.data.num_sequences * cfg.data.seq_len == 4_194_304 and cfg.data.seq_len == 4096
    assert (cfg.data.calibration, cfg.data.calibration_config, cfg.data.calibration_split) == (
        "HuggingFaceFW/fineweb-edu",
        "sample-10BT",
        "train",
    )
    assert (cfg.data.eval, cfg.data.eval_config, cfg.data.eval_split) == (
        "wikitext",
        "wikitext-2-raw-v1",
        "test",
    )
    se = cfg.search
    assert se.num_iterations == 4 and se.generations == [50, 50, 50, 50] and se.num_offspring == 128
    assert se.stages == [[16, 2048], [4, 16384], [1, 131072]] and se.topk == 8192


def test_ray_variant_differs_only_in_backend():
    """Same identity as the serial config, so one run can be resumed on either backend."""
    serial = resolve_config(str(CONFIGS / "llama31-8b-50.yaml"), [])
    ray = resolve_config(str(CONFIGS / "llama31-8b-50-ray.yaml"), [])
    assert serial.backend.kind == "serial" and identity_dict(ray) == identity_dict(serial)
    b = ray.backend
    assert (b.kind, b.address, b.num_workers, b.num_gpus_per_worker) == ("ray", "auto", 8, 1.0)


def test_70b_workers_span_several_gpus():
    b = resolve_config(str(CONFIGS / "llama31-70b-50.yaml"), []).backend
    assert b.kind == "ray" and b.num_gpus_per_worker == 4


def test_paper_configs_stream_a_capped_calibration_source():
    for name in PAPER:
        cfg = resolve_config(str(CONFIGS / name), [])
        assert cfg.data.max_source_tokens == 4 * 4_194_304


# Query heads, MLP channels and blocks of each shipped config's model (from their config.json files).
SHAPES = {
    "smollm2-135m": ({"attn": 9, "mlp": 1536}, 30),
    "meta-llama/Llama-3.1-8B": ({"attn": 32, "mlp": 14336}, 32),
    "meta-llama/Llama-3.1-70B": ({"attn": 64, "mlp": 28672}, 80),
    "Qwen/Qwen2.5-7B": ({"attn": 28, "mlp": 18944}, 28),
    "mistralai/Mistral-7B-v0.3": ({"attn": 32, "mlp": 14336}, 32),
}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_sparsity_suits_its_model(path):
    """The checks `tyr run` makes once the model's shapes are known pass for every shipped config."""
    cfg = resolve_config(str(path), [])
    units, num_layers = SHAPES[cfg.model.name]
    cfg.validate_for_model(units, num_layers)
