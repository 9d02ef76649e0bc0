"""`tyr export` / `tyr.load_pruned` / `tyr eval`.

Hand-built genomes with uneven query heads per KV group, dropped KV heads, fully pruned attention and MLP
layers are exported and loaded back in a fresh Python process that cannot import tyr (trust_remote_code);
logits must equal the in-process compact realisation, greedy decoding must not depend on the KV cache, and the
attention weights of the kept heads must equal the dense-masked export's. The folder follows Hugging Face
conventions: huggingface_hub's safetensors shards, transformers_version in config.json, a model card whose
front matter parses and whose body escapes what comes from run files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import smoke_args
from tests.tiny import char_tokenizer, random_tokens, tiny_config
from tyr import load_pruned
from tyr.errors import TyrError
from tyr.export import (
    compute_architecture,
    export_model,
    export_run,
    layer_shapes,
    markdown_escape,
    model_card,
)
from tyr.supernet.families import adapter_for
from tyr.supernet.realise import Realiser
from tyr.supernet.store import SupernetStore
from tyr.supernet.variant import Variant, genes_of

ATOL = 1e-5
PROMPT, NEW_TOKENS = 5, 8

# Per family: per layer (kept query heads, kept MLP channels: a count drawn at random, or None = dense gene),
# plus config overrides (biases, rope scaling, tied embeddings).
CASES = {
    # MHA: attention-free layer 0 (the KV cache's first layer stores nothing), MLP-free layer 1
    "llama_mha": ({0: ([], 17), 1: ([0, 2, 5], 0), 2: ([1, 2, 3, 4], 9)}, {}),
    # 2 KV heads x 3: uneven groups (2+1), attention-free layer 1, KV head 0 dropped + MLP-free layer 2;
    # o_proj / down_proj biases survive the fully pruned modules; llama3 rope scaling
    "llama_gqa": (
        {0: ([0, 1, 4], 23), 1: ([], 5), 2: ([3, 5], 0)},
        {
            "attention_bias": True,
            "mlp_bias": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 50000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    # 3 KV heads x 2: groups 2+1+0 (uneven and a dropped KV head), q/k/v biases, attention-free last layer
    "qwen2": (
        {0: ([0, 1, 2], 0), 1: ([1, 3, 4, 5], 31), 2: ([], 11)},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 5e3}},
    ),
    # qk-norm, tied embeddings, a dense MLP gene
    "qwen3": ({0: ([], 7), 1: ([0, 3, 4, 5], 0), 2: ([2], None)}, {"tie_word_embeddings": True}),
}
UNIFORM = {i: ([0, 2, 3, 5], 20) for i in range(3)}  # llama_gqa: 2 query heads on each KV head everywhere
# FLAP compensation biases on a bias-free llama: uniform counts, yet a per-layer config (o_proj of layers 0
# and 2 and down_proj of layer 1 gain a bias; layer 2's attention is fully pruned, only its bias remains)
FLAP = {0: ([0, 2, 3, 5], 20), 1: ([0, 2, 3, 5], 20), 2: ([], 20)}
FLAP_BIASES = {"0.attn", "1.mlp", "2.attn"}

_LOADER = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("tyr", "supernet", "search", "evaluators", "tests")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} must not be imported when loading an export")

    sys.meta_path.insert(0, Block())
    import builtins
    prompts = []

    def no_tty_input(prompt=""):  # what input() does without a terminal, but counted
        prompts.append(prompt)
        raise EOFError

    builtins.input = no_tty_input
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    jobs, results = json.load(open(sys.argv[1])), {}
    for job in jobs:
        model = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=job["trust"]).eval()
        asked = len(prompts)
        tokenizer = AutoTokenizer.from_pretrained(job["dir"])
        tokenizer_prompts = len(prompts) - asked
        ids = torch.tensor(job["ids"])
        gen = dict(max_new_tokens=job["new"], do_sample=False, pad_token_id=0)
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
            cache = DynamicCache()  # grown lazily: layers that never store keys must not set the length
            model(ids[:1, :6], cache=cache, use_cache=True)
            step = model(ids[:1, 6:9], cache=cache, use_cache=True).logits
            prompt = ids[:1, : job["prompt"]]
            padded = ids[:2, : job["prompt"]].clone()
            padded[0, :2] = 0
            mask = torch.ones_like(padded)
            mask[0, :2] = 0
            result = results[job["name"]] = {
                "class": type(model).__name__,
                "model_type": model.config.model_type,
                "dtype": str(next(model.parameters()).dtype),
                "params": sum(p.numel() for p in model.parameters()),
                "tied": model.lm_head.weight is model.model.embed_tokens.weight,
                "vocab": len(tokenizer),
                "tokenizer_prompts": tokenizer_prompts,
                "logits": logits.tolist(),
                "cache_step_error": (step - logits[:1, 6:9]).abs().max().item(),
                "cached": model.generate(prompt, use_cache=True, **gen).tolist(),
            }
            if job["full"]:
                result["uncached"] = model.generate(prompt, use_cache=False, **gen).tolist()
                result["padded_cached"] = model.generate(padded, attention_mask=mask, use_cache=True, **gen).tolist()
                result["padded_uncached"] = model.generate(
                    padded, attention_mask=mask, use_cache=False, **gen
                ).tolist()
            model.set_attn_implementation("eager")  # the implementation that returns attention weights
            attentions = model(ids, use_cache=False, output_attentions=True).attentions
            result["attentions"] = [a.tolist() for a in attentions]
            result["attention_shapes"] = [list(a.shape) for a in attentions]
    results["_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    json.dump(results, open(sys.argv[2], "w"))
    """
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and do not stall when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(family: str, overrides: dict, seed: int = 0):
    """A tiny random model like `tests.tiny.tiny_model`, with config overrides."""
    config = tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" not in name:
                p.normal_(0, 0.15)
    return model.eval()


def make_variants(model, layers: dict, seed: int = 0, biases: set[str] = frozenset()) -> list[Variant | None]:
    """Hand-built genome: kept units per layer, 're-fitted' weights = dense columns + noise; genes named in
    `biases` get a random compensation bias (as the FLAP criterion adds)."""
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(seed)
    variants = []
    for gene in genes_of(adapter.num_layers):
        heads, channels = layers[gene.layer]
        if gene.kind == "attn":
            kept = torch.tensor(heads, dtype=torch.long)
        elif channels is None:
            variants.append(None)
            continue
        else:
            kept = torch.randperm(adapter.intermediate_size, generator=g)[:channels].sort().values
        group = adapter.group_size(gene.kind)
        cols = (kept[:, None] * group + torch.arange(group)).reshape(-1)
        dense = adapter.output_proj(gene.layer, gene.kind).weight.detach()
        weight = dense[:, cols] + 0.05 * torch.randn(dense.shape[0], cols.numel(), generator=g)
        sparsity = 1 - kept.numel() / adapter.num_units(gene.kind)
        bias = 0.1 * torch.randn(dense.shape[0], generator=g) if gene.name in biases else None
        variants.append(Variant(gene, 1, sparsity, kept, weight, key=f"{gene.name}-{seed}", bias=bias))
    return variants


def compact_reference(model, variants, ids: torch.Tensor) -> dict:
    """Logits, parameter count and greedy tokens of the in-process compact realisation (restored after)."""
    realiser = Realiser(model, mode="compact")
    realiser.apply(variants)
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
            tokens = model.generate(
                ids[:1, :PROMPT], max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False, pad_token_id=0
            )
        params = sum(p.numel() for p in model.parameters())
    finally:
        realiser.restore_dense()
    return {"logits": logits, "params": params, "tokens": tokens.tolist()}


def _by_shard(state: dict, index: dict) -> list[list[torch.Tensor]]:
    files = sorted(set(index["weight_map"].values()))
    return [[t for k, t in state.items() if index["weight_map"][k] == f] for f in files]


def load_in_fresh_process(tmp_path, jobs: list[dict]) -> dict:
    """Load exports in a new interpreter with tyr unimportable and a private HF modules cache."""
    jobs_file, results_file = tmp_path / "jobs.json", tmp_path / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_MODULES_CACHE": str(tmp_path / "hf" / "modules"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _LOADER, str(jobs_file), str(results_file)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,  # AutoTokenizer asks about the remote code (and proceeds without it) on a tty
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(results_file.read_text())


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every case exported as hf (+ a uniform genome) and loaded in one fresh process; dense-masked too."""
    root = tmp_path_factory.mktemp("exports")
    ids = random_tokens(num_sequences=2, seq_len=12, seed=3)
    jobs, refs = [], {}
    cases = {name: (name, layers, overrides) for name, (layers, overrides) in CASES.items()}
    cases["uniform"] = ("llama_gqa", UNIFORM, {})
    cases["flap"] = ("llama_gqa", FLAP, {})
    for name, (family, layers, overrides) in cases.items():
        model = make_model(family, overrides)
        variants = make_variants(model, layers, biases=FLAP_BIASES if name == "flap" else frozenset())
        out = export_model(model, variants, root / f"{name}-hf", tokenizer=char_tokenizer())
        job = {"name": f"{name}-hf", "dir": str(out), "trust": (out / "modeling_tyr.py").is_file()}
        jobs.append(job | {"ids": ids.tolist(), "prompt": PROMPT, "new": NEW_TOKENS, "full": True})
        if name not in (
            "uniform",
            "flap",
        ):  # dense-masked: stock transformers (no tyr code involved) in this process
            masked = export_model(model, variants, root / f"{name}-masked", format="dense-masked")
            stock = AutoModelForCausalLM.from_pretrained(masked).eval()
            with torch.no_grad():
                refs[f"{name}-masked"] = {
                    "class": type(stock).__name__,
                    "config": stock.config.to_dict(),
                    "params": sum(p.numel() for p in stock.parameters()),
                    "logits": stock(ids).logits,
                    "tokens": stock.generate(
                        ids[:1, :PROMPT], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
                    ).tolist(),
                }
                stock.set_attn_implementation("eager")  # the implementation that returns attention weights
                refs[f"{name}-masked"]["attentions"] = stock(ids, output_attentions=True).attentions
        refs[name] = compact_reference(model, variants, ids) | {
            "dense_params": sum(p.numel() for p in model.parameters()),
            "architecture": json.loads((root / f"{name}-hf" / "architecture.json").read_text()),
            "config": json.loads((root / f"{name}-hf" / "config.json").read_text()),
        }
    return {"root": root, "refs": refs, "loaded": load_in_fresh_process(root, jobs)}


def test_fresh_process_never_imports_tyr(exports):
    assert exports["loaded"]["_imported"] == []


@pytest.mark.parametrize("name", list(CASES))
def test_hf_round_trip_matches_compact_realisation(exports, name):
    ref, got = exports["refs"][name], exports["loaded"][f"{name}-hf"]
    family = name.split("_")[0]
    assert got["model_type"] == f"tyr_{family}" and got["class"].startswith("Tyr")
    torch.testing.assert_close(torch.tensor(got["logits"]), ref["logits"], atol=ATOL, rtol=0)
    assert got["params"] == ref["params"] == ref["architecture"]["params"]["pruned"]
    assert got["uncached"] == got["cached"] == ref["tokens"]
    assert got["padded_cached"] == got["padded_uncached"]
    assert got["cache_step_error"] < ATOL
    assert got["vocab"] == len(char_tokenizer()) and got["dtype"] == "torch.float32"
    config = ref["config"]
    layers = CASES[name][0]
    assert config["num_attention_heads_per_layer"] == [len(layers[i][0]) for i in range(3)]
    assert config["head_dim"] == 8 and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_tyr.")


def test_config_preserves_rope_bias_and_tied_embeddings(exports):
    gqa = exports["refs"]["llama_gqa"]["config"]
    assert gqa["rope_parameters"]["rope_type"] == "llama3" and gqa["rope_parameters"]["factor"] == 4.0
    assert gqa["attention_bias"] and gqa["mlp_bias"]
    assert gqa["kv_head_index_per_layer"] == [[0, 0, 1], [], [0, 0]]
    assert gqa["num_key_value_heads_per_layer"] == [2, 0, 1]
    assert exports["refs"]["qwen2"]["config"]["rope_parameters"]["rope_theta"] == 5e3
    assert exports["refs"]["qwen3"]["config"]["tie_word_embeddings"] is True
    assert exports["loaded"]["qwen3-hf"]["tied"] and not exports["loaded"]["llama_gqa-hf"]["tied"]


@pytest.mark.parametrize("name", list(CASES))
def test_dense_masked_equals_hf_with_stock_transformers(exports, name):
    masked, hf = exports["refs"][f"{name}-masked"], exports["loaded"][f"{name}-hf"]
    assert not (exports["root"] / f"{name}-masked" / "modeling_tyr.py").exists()
    family = name.split("_")[0]
    assert masked["class"] == {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family] + "ForCausalLM"
    assert masked["config"]["num_attention_heads"] == 6 and masked["config"]["intermediate_size"] == 40
    assert masked["params"] == exports["refs"][name]["dense_params"]
    torch.testing.assert_close(masked["logits"], torch.tensor(hf["logits"]), atol=ATOL, rtol=0)
    assert masked["tokens"] == hf["cached"]


@pytest.mark.parametrize("name", list(CASES))
def test_output_attentions_are_the_kept_heads_of_dense_masked(exports, name):
    """trust_remote_code model, eager attention: one (B, kept heads, T, T) tensor per layer, equal to the
    dense-masked model's weights of the kept heads; a fully pruned layer gives (B, 0, T, T)."""
    got, masked = exports["loaded"][f"{name}-hf"], exports["refs"][f"{name}-masked"]["attentions"]
    assert len(got["attentions"]) == len(masked) == 3
    for i, (values, shape, dense) in enumerate(zip(got["attentions"], got["attention_shapes"], masked)):
        heads = CASES[name][0][i][0]
        weights = torch.tensor(values, dtype=torch.float32).reshape(shape)  # (B, kept heads, T, T)
        assert tuple(weights.shape) == (2, len(heads), 12, 12), i
        torch.testing.assert_close(weights, dense[:, heads], atol=ATOL, rtol=0)
        if heads:
            torch.testing.assert_close(weights.sum(-1), torch.ones(2, len(heads), 12), atol=ATOL, rtol=0)


def test_output_attentions_in_process(tmp_path):
    """`tyr.load_pruned` (tyr's own classes) returns the same per-layer attention weights."""
    layers, overrides = CASES["llama_gqa"]
    model = make_model("llama_gqa", overrides)
    variants = make_variants(model, layers)
    hf = export_model(model, variants, tmp_path / "hf")
    masked = export_model(model, variants, tmp_path / "masked", format="dense-masked")
    ids = random_tokens(2, 7, seed=4)
    with torch.no_grad():
        got = load_pruned(hf, attn_implementation="eager")(ids, output_attentions=True).attentions
        stock = AutoModelForCausalLM.from_pretrained(masked, attn_implementation="eager").eval()
        dense = stock(ids, output_attentions=True).attentions
        assert load_pruned(hf)(ids, output_attentions=True).attentions == ()  # sdpa gives none, as stock
    assert [tuple(a.shape) for a in got] == [(2, len(layers[i][0]), 7, 7) for i in range(3)]
    for i, (weights, reference) in enumerate(zip(got, dense)):
        torch.testing.assert_close(weights, reference[:, layers[i][0]], atol=ATOL, rtol=0)


def test_tokenizer_loads_without_trust_remote_code(exports):
    for name in [*CASES, "uniform", "flap"]:
        assert exports["loaded"][f"{name}-hf"]["vocab"] == len(char_tokenizer()), name
    assert exports["loaded"]["uniform-hf"]["tokenizer_prompts"] == 0  # a stock config asks nothing


@pytest.mark.xfail(
    strict=True,
    reason="transformers 5.x: AutoTokenizer always reads config.json through AutoConfig with "
    "trust_remote_code=None, which asks about the auto_map['AutoConfig'] of a model type it does not know "
    "(tyr_*); no file of the export avoids that short of a stock model_type",
)
def test_tokenizer_of_a_tyr_config_asks_nothing(exports):
    assert [exports["loaded"][f"{name}-hf"]["tokenizer_prompts"] for name in CASES] == [0] * len(CASES)


def test_config_keeps_transformers_version_only_drops_provenance(exports):
    for folder in ("llama_gqa-hf", "uniform-hf", "qwen2-masked"):
        config = json.loads((exports["root"] / folder / "config.json").read_text())
        assert config["transformers_version"] == transformers.__version__, folder
        assert not {"_name_or_path", "_commit_hash"} & set(config), folder
    assert "auto_map" not in json.loads((exports["root"] / "uniform-hf" / "config.json").read_text())


def test_tied_embeddings_are_stored_once(exports):
    for name, tied in (("qwen3", True), ("llama_gqa", False)):
        with safe_open(exports["root"] / f"{name}-hf" / "model.safetensors", "pt") as f:
            keys = set(f.keys())
            assert f.metadata()["format"] == "pt"
        assert "model.embed_tokens.weight" in keys and ("lm_head.weight" in keys) is not tied, name


def test_flap_compensation_biases_round_trip(exports):
    got, ref = exports["loaded"]["flap-hf"], exports["refs"]["flap"]
    config = ref["config"]
    assert config["o_proj_bias_per_layer"] == [True, False, True]
    assert config["down_proj_bias_per_layer"] == [False, True, False]
    assert got["class"].startswith("Tyr")  # uniform counts, but a stock config cannot hold the biases
    torch.testing.assert_close(torch.tensor(got["logits"]), ref["logits"], atol=ATOL, rtol=0)
    assert got["params"] == ref["params"] == ref["architecture"]["params"]["pruned"]
    assert got["uncached"] == got["cached"] == ref["tokens"]


def test_flap_biases_refuse_dense_masked(tmp_path):
    model = make_model("llama_gqa", {})
    variants = make_variants(model, FLAP, biases=FLAP_BIASES)
    with pytest.raises(TyrError, match="--format hf"):
        export_model(model, variants, tmp_path / "masked", format="dense-masked")
    assert not (tmp_path / "masked").exists()


def test_uniform_genome_gives_stock_config(exports):
    got, ref = exports["loaded"]["uniform-hf"], exports["refs"]["uniform"]
    config = ref["config"]
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (
        4,
        2,
        20,
    )
    assert config["head_dim"] == 8 and not (exports["root"] / "uniform-hf" / "modeling_tyr.py").exists()
    assert got["class"] == "LlamaForCausalLM"  # loaded without trust_remote_code
    torch.testing.assert_close(torch.tensor(got["logits"]), ref["logits"], atol=ATOL, rtol=0)
    assert got["params"] == ref["params"] and got["cached"] == got["uncached"] == ref["tokens"]


def test_load_pruned_in_process_and_dtype(tmp_path):
    # 5 heads everywhere is uniform, but Llama's config refuses hidden_size % heads != 0: per-layer config then
    model = make_model("llama_mha", {}).to(torch.bfloat16)
    variants = make_variants(model, {i: ([0, 1, 2, 4, 5], 12) for i in range(3)})
    out = export_model(model, variants, tmp_path / "bf16", tokenizer=char_tokenizer())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tyr_llama" and config["dtype"] == "bfloat16"
    loaded = load_pruned(out)
    assert type(loaded).__name__ == "TyrLlamaForCausalLM" and loaded.dtype == torch.bfloat16
    ids = random_tokens(2, 10, seed=1)
    ref = compact_reference(model, variants, ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref["logits"], atol=0.05, rtol=0.02)
    sharded = export_model(model, variants, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*"))) > 1
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == shards
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    state = {}
    for shard in shards:
        with safe_open(sharded / shard, "pt") as f:
            assert f.metadata()["format"] == "pt"
        state.update(load_file(sharded / shard))
    assert set(state) == set(index["weight_map"]) and "lm_head.weight" in state
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert all(
        sum(t.numel() * t.element_size() for t in shard) <= 20_000 for shard in _by_shard(state, index)
    )
    assert not list(tmp_path.glob(".*"))  # no temp folders left next to the exports
    with torch.no_grad():
        assert torch.equal(load_pruned(sharded)(ids).logits, loaded(ids).logits)
    # the dense model is left exactly as it was
    fresh = make_model("llama_mha", {}).to(torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


# ------------------------------------------------------------------------------------ run directories, CLI
@pytest.fixture
def cli(monkeypatch):
    """`tyr.cli.main`, with the export/eval subcommands registered if cli.py does not have them yet."""
    import tyr.cli as cli_module
    from tyr.evaluate import add_eval_parser
    from tyr.export import add_export_parser

    original = cli_module.build_parser

    def build_parser():
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "export" not in sub.choices:
            add_export_parser(sub)
        if "eval" not in sub.choices:
            add_eval_parser(sub)
        return parser

    monkeypatch.setattr(cli_module, "build_parser", build_parser)
    return cli_module.main


def _fails(capsys, main, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("tyr: error: ")
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tiny_assets, tmp_path_factory):
    from tyr.cli import main

    run = tmp_path_factory.mktemp("export-run") / "run"
    assert main(smoke_args(tiny_assets, run)) == 0
    return run


def test_export_run_matches_the_runs_final_genome(cli, capsys, finished_run, tiny_assets, tmp_path):
    out = tmp_path / "pruned"
    assert cli(["export", str(finished_run), "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    arch = json.loads((finished_run / "final" / "architecture.json").read_text())
    metrics = json.loads((finished_run / "final" / "metrics.json").read_text())
    assert json.loads((out / "architecture.json").read_text()) == arch
    assert _front_matter(out / "README.md")["base_model"] == os.path.basename(tiny_assets["model"])
    assert f"{metrics['searched']['ppl']:.2f}" in (out / "README.md").read_text()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name

    dense = AutoModelForCausalLM.from_pretrained(tiny_assets["model"], dtype=torch.float32).eval()
    result = json.loads((finished_run / "iter-2" / "result.json").read_text())
    store = SupernetStore.open(finished_run / "iter-2" / "supernet")
    variants = [store.variant(g, lv) for g, lv in zip(genes_of(3), result["genome"])]
    ids = random_tokens(2, 16, seed=5)
    ref = compact_reference(dense, variants, ids)
    # `tyr run` (from the supernet manifest) and the export (from the variants) compute the same architecture
    adapter = adapter_for(dense)
    shapes = layer_shapes(adapter, variants)
    assert compute_architecture(dense, adapter, shapes, arch["base_model"], arch["target_sparsity"]) == arch
    model = load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref["logits"], atol=ATOL, rtol=0)
    assert sum(p.numel() for p in model.parameters()) == arch["params"]["pruned"] == ref["params"]

    masked = tmp_path / "masked"
    assert export_run(finished_run, masked, format="dense-masked") == masked
    stock = AutoModelForCausalLM.from_pretrained(masked).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ref["logits"], atol=ATOL, rtol=0)


def test_eval_reproduces_the_runs_metrics(cli, capsys, finished_run, tiny_assets, tmp_path):
    metrics = json.loads((finished_run / "final" / "metrics.json").read_text())["searched"]
    assert cli(["eval", str(finished_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "run" and result["base"]["model"] == tiny_assets["model"]
    assert result["ppl"] == pytest.approx(metrics["ppl"], rel=1e-4)
    assert result["kl"] == pytest.approx(metrics["kl"], rel=1e-3, abs=1e-6)

    out = tmp_path / "pruned"
    export_run(finished_run, out)
    argv = ["eval", str(out), "--data", tiny_assets["eval"], "--seq-len", "32", "--topk", "16"]
    assert cli([*argv, "--json"]) == 0
    folder = json.loads(capsys.readouterr().out)
    assert folder["kind"] == "folder" and folder["ppl"] == pytest.approx(result["ppl"], rel=1e-6)
    assert folder["kl"] == pytest.approx(result["kl"], rel=1e-6)
    assert cli([*argv, "--num-sequences", "1"]) == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "KL to base" in text


def test_eval_tasks_through_lm_eval(monkeypatch, finished_run, tiny_assets, tmp_path):
    import types

    from tyr.evaluate import evaluate

    out = export_run(finished_run, tmp_path / "pruned")
    seen = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            seen.update(model=pretrained, tokenizer=tokenizer, batch_size=batch_size)

    def simple_evaluate(model, tasks, **kwargs):
        seen.update(lm=model, tasks=tasks, kwargs=kwargs)
        return {"results": {t: {"alias": t, "acc,none": 0.25, "acc_stderr,none": 0.01} for t in tasks}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    models, huggingface = types.ModuleType("lm_eval.models"), types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    for name, module in (
        ("lm_eval", lm_eval),
        ("lm_eval.models", models),
        ("lm_eval.models.huggingface", huggingface),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    result = evaluate(
        str(out), data=tiny_assets["eval"], seq_len=32, num_sequences=1, tasks=["arc_easy"], limit=5
    )
    assert result["tasks"] == {"arc_easy": {"acc,none": 0.25, "acc_stderr,none": 0.01}}
    assert seen["tasks"] == ["arc_easy"] and seen["kwargs"] == {"limit": 5}
    assert seen["model"].config.model_type.startswith(("tyr_", "llama"))


def test_eval_without_lm_eval_says_how_to_install(cli, capsys, finished_run):
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("lm_eval is installed")
    _fails(capsys, cli, ["eval", str(finished_run), "--tasks", "arc_easy"], "pip install lm-eval")


def test_export_bad_inputs(cli, capsys, finished_run, tmp_path, monkeypatch):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    _fails(capsys, cli, ["export", str(unfinished), "--out", str(tmp_path / "o")], "has not finished")
    _fails(capsys, cli, ["eval", str(unfinished)], "has not finished")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _fails(capsys, cli, ["export", str(foreign), "--out", str(tmp_path / "o")], "not a Tyr run directory")
    _fails(capsys, cli, ["eval", str(foreign)], "neither a Tyr run directory")
    _fails(capsys, cli, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "does not exist")
    _fails(capsys, cli, ["eval", str(tmp_path / "missing")], "does not exist")

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, cli, ["export", str(finished_run), "--out", str(out)], "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    for inside in (finished_run, finished_run / "final", finished_run.parent):
        _fails(capsys, cli, ["export", str(finished_run), "--out", str(inside), "--force"], "would overwrite")
    assert (finished_run / "final" / "architecture.json").is_file()

    earlier = tmp_path / "earlier"
    assert cli(["export", str(finished_run), "--out", str(earlier)]) == 0
    (earlier / "marker.txt").write_text("from the earlier export")

    def broken(*args, **kwargs):
        raise TyrError("disk full")

    import tyr.export.weights

    write_weights = tyr.export.weights.write_weights
    monkeypatch.setattr(tyr.export.weights, "write_weights", broken)
    # --force replaces only an earlier export, never a folder Tyr did not write
    _fails(
        capsys,
        cli,
        ["export", str(finished_run), "--out", str(out), "--force"],
        "not an earlier `tyr export`",
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _fails(capsys, cli, ["export", str(finished_run), "--out", str(earlier), "--force"], "disk full")
    assert (earlier / "marker.txt").is_file()  # the earlier export survives a failed one
    _fails(capsys, cli, ["export", str(finished_run), "--out", str(tmp_path / "new")], "disk full")
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(tyr.export.weights, "write_weights", write_weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "foreign", "taken", "unfinished"]

    assert cli(["export", str(finished_run), "--out", str(earlier), "--force"]) == 0
    assert (earlier / "config.json").is_file() and not (earlier / "marker.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "foreign", "taken", "unfinished"]
    with pytest.raises(TyrError, match="unknown export format"):
        export_run(finished_run, tmp_path / "x", format="gguf")


# ---------------------------------------------------------------------------------------------- model card
def _front_matter(readme) -> dict:
    text = readme.read_text() if hasattr(readme, "read_text") else readme
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _small_export(tmp_path, name: str = "out", **kwargs):
    model = make_model("llama_gqa", {})
    return export_model(model, make_variants(model, UNIFORM), tmp_path / name, **kwargs)


def test_front_matter_is_yaml_for_the_hub(exports, tmp_path):
    meta = _front_matter(exports["root"] / "llama_gqa-hf" / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["pruned", "structured-pruning", "tyr"]
    assert "license" not in meta and "base_model" not in meta  # a model built from a config has no name
    out = _small_export(tmp_path, base_model="HuggingFaceTB/SmolLM2-135M")
    assert _front_matter(out / "README.md")["base_model"] == "HuggingFaceTB/SmolLM2-135M"


def test_license_is_copied_from_the_base_models_card(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# Base\n")
    meta = _front_matter(_small_export(tmp_path, "a", base_model_path=base) / "README.md")
    assert meta["license"] == "apache-2.0" and "language" not in meta
    (base / "README.md").write_text(
        "---\nlicense: other\nlicense_name: my-license\nlicense_link: LICENSE\n---\n"
    )
    meta = _front_matter(_small_export(tmp_path, "b", base_model=str(base)) / "README.md")  # via base_model
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "my-license", "LICENSE")


def test_license_is_found_in_the_local_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--org--base"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "README.md").write_text("---\nlicense: mit\n---\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    meta = _front_matter(_small_export(tmp_path, base_model="org/base") / "README.md")
    assert (meta["base_model"], meta["license"]) == ("org/base", "mit")


def test_unknown_license_is_omitted_with_a_warning(tmp_path, caplog):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("# no front matter\n")
    with caplog.at_level("WARNING", logger="tyr.export"):
        out = _small_export(tmp_path, base_model_path=base)
    assert "license" not in _front_matter(out / "README.md")
    assert any("license" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_markdown_escape():
    assert markdown_escape("a|b`c<d>&e") == r"a\|b\`c&lt;d&gt;&amp;e"
    assert markdown_escape("x\n\n# y  *z* [l](u) _w_ ~s~ \\") == r"x \# y \*z\* \[l\](u) \_w\_ \~s\~ \\"
    assert markdown_escape(12) == "12"


def test_model_card_escapes_strings_from_run_files():
    evil = "org/m|x`y<img src=x onerror=alert(1)>\n# Owned\n| a | b |"
    layer0 = {"attention": {"kept_heads": [0], "kept_kv_heads": [0]}, "mlp": {"kept_channels_count": 3}}
    layer1 = {"attention": {"kept_heads": [], "kept_kv_heads": []}, "mlp": {"kept_channels_count": 0}}
    architecture = {
        "base_model": evil,
        "model_type": "llama<b>",
        "target_sparsity": 0.5,
        "achieved_sparsity": 0.45,
        "params": {"dense": 100, "pruned": 60, "prunable_dense": 80, "prunable_pruned": 40},
        "layers": [{"index": 0, **layer0}, {"index": "1|9\n# x", **layer1}],
    }
    metrics = {
        "eval_data": "wiki|text\n| injected | 0.00 | 0 |\n<script>alert(1)</script>",
        "eval_tokens": 64,
        "topk": "5`",
        **{m: {"ppl": 10.0, "kl": 0.1} for m in ("dense", "uniform", "searched")},
    }
    card = model_card(architecture, metrics, "hf", True, {"num_attention_heads": 6, "intermediate_size": 40})
    assert _front_matter(card)["base_model"] == evil  # YAML holds any string
    body = card.split("---\n", 2)[2].splitlines()
    assert not any(tag in line for line in body for tag in ("<script", "<img", "<b>"))
    assert [line for line in body if line.startswith("#")] == [
        "# org/m\\|x\\`y&lt;img src=x onerror=alert(1)&gt; \\# Owned \\| a \\| b \\|, structurally pruned with Tyr",
        "## Measured quality",
        "## Usage",
        "## Per-layer structure",
    ]
    rows = [line for line in body if line.startswith("|")]
    assert len(rows) == (2 + 3) + (2 + 2)  # two tables: header + separator + 3 metric rows, + 2 layer rows
    for row in rows:  # escaped pipes stay inside their cell: 3 or 4 cells per row
        assert len(re.split(r"(?<!\\)\|", row)) - 2 in (3, 4), row


def test_pipeline_architecture_is_the_exports(tmp_path):
    """`tyr run`'s architecture.json (from the manifest) equals the export's (from the variants), FLAP biases
    included, and its parameter count is the manifest's."""
    import types

    from tests.tiny import tiny_model
    from tyr import pipeline
    from tyr.supernet.builder import BuildPlan, build_supernet
    from tyr.supernet.ladder import centre_for_sparsity, make_ladder, step_units

    model = tiny_model("llama_gqa", num_layers=2)
    adapter = adapter_for(model)
    ladders = []
    for gene in genes_of(adapter.num_layers):
        n, multiple = adapter.num_units(gene.kind), 1 if gene.kind == "attn" else 4
        step = step_units(n, 0.125, 1, multiple)
        ladders.append(make_ladder(gene, n, centre_for_sparsity(n, 0.5, multiple), step, 3))
    plan = BuildPlan(ladders, "expectation", batch_size=2, criterion="flap")
    store = SupernetStore.create_or_resume(tmp_path / "sn", {"test": "flap"})
    build_supernet(model, adapter, random_tokens(4, 16), plan, store, progress=False)
    genes, genome = genes_of(adapter.num_layers), (1, 0, -1, 1)
    session = types.SimpleNamespace(
        adapter=adapter, model=model, resolved=types.SimpleNamespace(source="base")
    )
    arch = pipeline.architecture(session, store, genome, 0.5)
    variants = [store.variant(g, lv) for g, lv in zip(genes, genome)]
    assert arch == compute_architecture(model, adapter, layer_shapes(adapter, variants), "base", 0.5)
    manifest_params = sum(store.level_entry(g, lv).params for g, lv in zip(genes, genome))
    assert arch["params"]["prunable_pruned"] == manifest_params
    assert arch["achieved_sparsity"] == 1.0 - manifest_params / adapter.dense_prunable_params()
