"""`tyr export` / `tyr.load_pruned` / `tyr eval`.

Hand-built genomes with uneven query heads per KV group, dropped KV heads, fully pruned attention and MLP
layers are exported and loaded back in a fresh Python process that cannot import tyr (trust_remote_code);
logits must equal the in-process compact realisation, greedy decoding must not depend on the KV cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import smoke_args
from tests.tiny import char_tokenizer, random_tokens, tiny_config
from tyr import load_pruned
from tyr.errors import TyrError
from tyr.export import export_model, export_run
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    jobs, results = json.load(open(sys.argv[1])), {}
    for job in jobs:
        model = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=job["trust"]).eval()
        tokenizer = AutoTokenizer.from_pretrained(job["dir"])
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
    assert f"{metrics['searched']['ppl']:.2f}" in (out / "README.md").read_text()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name

    dense = AutoModelForCausalLM.from_pretrained(tiny_assets["model"], dtype=torch.float32).eval()
    result = json.loads((finished_run / "iter-2" / "result.json").read_text())
    store = SupernetStore.open(finished_run / "iter-2" / "supernet")
    variants = [store.variant(g, lv) for g, lv in zip(genes_of(3), result["genome"])]
    ids = random_tokens(2, 16, seed=5)
    ref = compact_reference(dense, variants, ids)
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

    def broken(*args, **kwargs):
        raise TyrError("disk full")

    import tyr.export

    write_weights = tyr.export.write_weights
    monkeypatch.setattr(tyr.export, "write_weights", broken)
    _fails(capsys, cli, ["export", str(finished_run), "--out", str(out), "--force"], "disk full")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old folder survives a failed export
    _fails(capsys, cli, ["export", str(finished_run), "--out", str(tmp_path / "new")], "disk full")
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(tyr.export, "write_weights", write_weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "taken", "unfinished"]  # no temp folders

    assert cli(["export", str(finished_run), "--out", str(out), "--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "taken", "unfinished"]
    with pytest.raises(TyrError, match="unknown export format"):
        export_run(finished_run, tmp_path / "x", format="gguf")
