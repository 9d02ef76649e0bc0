"""Streamed, offloadable supernet build: every offload mode builds the same bytes; device memory is flat in N."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from tests.tiny import random_tokens, tiny_model
from tyr.config import RunConfig, dump_yaml, identity_dict, resolve_config
from tyr.rundir import RunDir, config_difference
from tyr.supernet.builder import BuildPlan, Offload, build_supernet
from tyr.supernet.families import adapter_for
from tyr.supernet.hidden import open_hidden_store
from tyr.supernet.ladder import centre_for_sparsity, make_ladder, step_units
from tyr.supernet.pruner import PrunerOptions
from tyr.supernet.store import SupernetStore
from tyr.supernet.variant import genes_of


def _plan(adapter, **kwargs) -> BuildPlan:
    ladders = []
    for gene in genes_of(adapter.num_layers):
        n = adapter.num_units(gene.kind)
        multiple = 1 if gene.kind == "attn" else 4
        step = step_units(n, 0.125, 1, multiple)
        ladders.append(make_ladder(gene, n, centre_for_sparsity(n, 0.5, multiple), step, 5))
    return BuildPlan(
        ladders, "expectation", PrunerOptions(), PrunerOptions(num_rounds=4), batch_size=2, **kwargs
    )


def _build(directory: Path, model, tokens, plan, offload: Offload):
    store = SupernetStore.create_or_resume(directory, {"test": 1})
    return build_supernet(model, adapter_for(model), tokens, plan, store, progress=False, offload=offload)


def _digests(directory: Path) -> dict[str, str]:
    """sha256 of every variant file, plus the manifest as parsed JSON."""
    files = {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.safetensors"))
    }
    return {**files, "manifest": json.loads((directory / "manifest.json").read_text())}


@pytest.mark.parametrize("mode", ["none", "host", "disk"])
def test_hidden_store_round_trip(tmp_path, mode):
    """Chunks of 2 of 5 sequences (a short last one) come back as they were put; disk removes its file."""
    data = torch.randn(5, 3, 4, dtype=torch.bfloat16)
    with open_hidden_store(mode, (5, 3, 4), torch.bfloat16, torch.device("cpu"), 2, tmp_path / "d") as store:
        assert store.num_chunks == 3 and store.bounds(2) == (4, 5)
        for i in range(store.num_chunks):
            a, b = store.bounds(i)
            store.put(i, data[a:b].clone())
        assert (tmp_path / "d").is_dir() == (mode == "disk")
        assert torch.equal(torch.cat([store.get(i) for i in range(store.num_chunks)]), data)
        assert store.device_bytes == (data.numel() * 2 if mode == "none" else 0)
    assert not (tmp_path / "d").exists()


def test_every_offload_mode_builds_the_same_supernet(tmp_path):
    """fp32, 5 sequences in chunks of 2 (a short last chunk); TF32 is a no-op on the CPU."""
    model = tiny_model("qwen2")  # biases in q/k/v: the propagated output carries them
    tokens = random_tokens(5, 16)
    plan = _plan(adapter_for(model))
    builds = {
        "none": (plan, Offload("none")),
        "host": (plan, Offload("host")),
        "disk": (plan, Offload("disk", tmp_path / "offload")),
        "host-tf32": (replace(plan, hessian_tf32=True), Offload("host")),
    }
    digests = {}
    for name, (build_plan, offload) in builds.items():
        report = _build(tmp_path / name, model, tokens, build_plan, offload)
        assert report.ledger["offload"] == offload.mode
        digests[name] = _digests(tmp_path / name)
    assert len(digests["none"]) == 2 * 3 * 5 + 1
    for name in builds:
        assert digests[name] == digests["none"], name
    assert not (tmp_path / "offload").exists()  # the disk build removes its file and folder


def test_disk_build_removes_its_files_when_interrupted(tmp_path, monkeypatch):
    model = tiny_model("llama_gqa", num_layers=2)
    offload = Offload("disk", tmp_path / "offload")

    def interrupted(*args, **kwargs):
        assert (offload.directory / "hidden.bin").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(SupernetStore, "write_gene", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "sn", model, random_tokens(4, 16), _plan(adapter_for(model)), offload)
    assert not offload.directory.exists()


def _gene_peaks(model, num_sequences: int, offload: Offload, directory: Path) -> list[int]:
    report = _build(directory, model, random_tokens(num_sequences, 16), _plan(adapter_for(model)), offload)
    return [gene["peak"] for gene in report.ledger["genes"]]


@pytest.mark.parametrize("mode", ["host", "disk", "none"])
def test_device_peak_is_flat_in_the_number_of_sequences(tmp_path, mode):
    """The device holds one chunk at a time with host/disk; with none it holds every sequence."""
    model = tiny_model("llama_gqa", num_layers=2)
    offload = Offload(mode, tmp_path / "offload")
    small = _gene_peaks(model, 8, offload, tmp_path / "n8")
    large = _gene_peaks(model, 32, offload, tmp_path / "n32")
    assert len(small) == len(large) == 4 and min(small) > 0
    if mode == "none":
        assert all(b > a for a, b in zip(small, large, strict=True))
    else:
        assert small == large


def test_build_json_and_offload_folder_of_a_run(tmp_path, tiny_assets):
    """`tyr build` with offload=disk writes build.json and leaves no offload folder; the offload settings
    are not run identity, so the run resumes with another mode."""
    from tests.conftest import smoke_args
    from tyr.cli import main

    out = tmp_path / "run"
    argv = smoke_args(tiny_assets, out)
    argv[0] = "build"
    argv.remove("--eval-data")
    argv.remove(tiny_assets["eval"])
    assert main([*argv, "--set", "supernet.offload=disk", "--set", "model.num_layers=2"]) == 0
    run = RunDir(out)
    ledger = json.loads(run.build_ledger_path(1).read_text())
    assert ledger["offload"] == "disk" and ledger["num_sequences"] == 8
    assert [g["gene"] for g in ledger["genes"]] == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    assert all(g["built"] and g["peak"] > 0 for g in ledger["genes"])
    assert set(ledger["peak_bytes_by_phase"]) == {"capture", "prune", "propagate"}
    assert not run.offload_dir(1).exists()
    assert "offload" not in run.config_path.read_text()
    assert main([*argv, "--set", "supernet.offload=none", "--set", "model.num_layers=2"]) == 0
    ledger = json.loads(run.build_ledger_path(1).read_text())
    assert ledger["offload"] == "none" and not any(g["built"] for g in ledger["genes"])


def test_a_killed_builds_offload_folder_is_swept(tmp_path):
    run = RunDir(tmp_path)
    stale = run.offload_dir(2)
    stale.mkdir(parents=True)
    (stale / "hidden.bin").write_bytes(b"\0" * 4096)
    assert stale.parent == run.iteration_dir(2)
    assert stale in run.sweep_temporary_files()
    assert not stale.exists() and run.iteration_dir(2).is_dir()


def test_build_settings_identity():
    """offload and offload_dir cannot change a result; hessian_tf32 and solve_dtype can, and their defaults
    reproduce a run stored before they existed."""
    cfg = resolve_config(None, ["supernet.offload=disk", "supernet.offload_dir=/tmp/x"])
    assert cfg.supernet.offload == "disk"
    assert "offload" not in identity_dict(cfg)["supernet"]
    assert "offload_dir" not in identity_dict(cfg)["supernet"]
    assert RunConfig().supernet.offload == "auto"
    default = resolve_config(None, ["supernet.refit=zero"])  # what runs stored before the key did
    stored = yaml.safe_load(dump_yaml(default))
    for key in ("hessian_tf32", "solve_dtype", "refit"):
        del stored["supernet"][key]  # as an older Tyr wrote it
    assert config_difference(stored, dump_yaml(default)) is None
    changed = resolve_config(None, ["supernet.refit=zero", "supernet.solve_dtype=float32"])
    assert "solve_dtype" in config_difference(stored, dump_yaml(changed))
    # the presets' dense refit: a run stored before the key resumes with the same command, as it began (zero)
    assert config_difference(stored, dump_yaml(resolve_config(None, []))) is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("supernet.offload=gpu", "supernet.offload must be one of"),
        ("supernet.solve_dtype=float16", "supernet.solve_dtype must be one of"),
        ("supernet.offload_dir=", "supernet.offload_dir must name a folder"),
        ("supernet.refit=ones", "supernet.refit must be one of"),
    ],
)
def test_bad_build_settings_are_refused(override, message):
    from tyr.errors import TyrError

    with pytest.raises(TyrError, match=message):
        resolve_config(None, [override])


@pytest.mark.parametrize("other", ["supernet.criterion=wanda-sp", "supernet.use_hessian=false"])
def test_dense_refit_needs_the_tyr_refit(other):
    from tyr.errors import TyrError

    with pytest.raises(TyrError, match="leave supernet.refit at zero"):
        resolve_config(None, ["supernet.refit=dense", other])


def test_refit_reaches_the_pruner_options():
    from tyr.pipeline import build_plan

    plan = build_plan(resolve_config(None, []), [])  # every preset re-fits toward the dense weights
    assert plan.attn_options.refit == plan.mlp_options.refit == "dense"
    assert build_plan(resolve_config(None, ["supernet.refit=zero"]), []).mlp_options.refit == "zero"


@pytest.mark.parametrize("schedule", ["paper", "cpu", "smoke"])
@pytest.mark.parametrize("other", ["supernet.criterion=wanda-sp", "supernet.use_hessian=false"])
def test_a_criterion_without_refit_leaves_the_presets_refit_at_the_default(schedule, other):
    assert resolve_config(None, [f"schedule={schedule}"]).supernet.refit == "dense"
    assert resolve_config(None, [f"schedule={schedule}", other]).supernet.refit == "zero"
