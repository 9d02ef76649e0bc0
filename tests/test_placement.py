"""model.placement: the balanced device map, blocks lent from host RAM (offload), and every stage of Tyr on a model
whose embedding, blocks and head sit on different devices.

There is no GPU here. The multi-device tests run in a subprocess (`_mock_device_checks`) that registers a mock
accelerator, ``mockgpu``, through PyTorch's Python backend hooks (device guards, so indexing works) and wraps CPU
tensors in `_MockTensor`s that report a ``mockgpu:N`` device. `_MockDevices` runs every op on the CPU data and, like
CUDA, refuses an op whose tensors sit on different devices (0-dim CPU tensors excepted; copies between devices are
allowed). So a forward pass that meets a block left in host RAM, or a KL, perplexity or teacher pass that puts
labels or targets on the embedding's device while the logits sit on the head's, fails in the subprocess exactly
where it would fail on GPUs (the negative control checks that it does). Because all the arithmetic still runs on
the CPU, every number must equal the single-device reference bitwise. What the mock cannot show: kernels, memory,
transfer speed and streams of real GPUs (balanced and offload never ran on one here).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.tiny import random_tokens, save_tiny_checkpoint, tiny_config, tiny_model
from tyr.config import RunConfig, identity_dict, resolve_config
from tyr.errors import TyrError
from tyr.models import (
    ResolvedModel,
    balanced_device_map,
    load_model,
    offload_blocks,
    resolve_placement,
)
from tyr.supernet.realise import Realiser, on_device

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- device map
def _meta_model(family: str = "llama_gqa", num_layers: int = 7, tied: bool = False):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, num_layers)
    config.tie_word_embeddings = tied
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _loads(model, device_map) -> dict[torch.device, int]:
    loads: dict[torch.device, int] = {}
    for name, device in device_map.items():
        module = model.get_submodule(name)
        loads[device] = loads.get(device, 0) + sum(p.numel() * 4 for p in module.parameters(recurse=True))
    return loads


def test_balanced_map_spreads_whole_blocks_evenly():
    """7 blocks over 3 devices: embedding first, norm and head last, blocks in order, every parameter covered,
    and no device more than one block above an equal share of the bytes."""
    model = _meta_model(num_layers=7)
    devices = [torch.device(f"cuda:{i}") for i in range(3)]
    device_map = balanced_device_map(model, devices)
    assert device_map["model.embed_tokens"] == devices[0]
    assert device_map["model.rotary_emb"] == devices[0]
    assert device_map["model.norm"] == device_map["lm_head"] == devices[2]
    order = [devices.index(device_map[f"model.layers.{i}"]) for i in range(7)]
    assert order == sorted(order) and set(order) == {0, 1, 2}
    covered = {n for n, _ in model.named_parameters() if any(n.startswith(k + ".") for k in device_map)}
    assert covered == {n for n, _ in model.named_parameters()}
    loads = _loads(model, device_map)
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    share = sum(loads.values()) / 3
    assert max(loads.values()) <= share + block


def test_balanced_map_counts_the_embedding_and_a_tied_head():
    """A big embedding takes blocks off the first device; a tied head stays with the embedding."""
    model = _meta_model(num_layers=6)  # vocab 101 x 48 embedding ~ half a block; untied head ~ half a block
    devices = ["cuda:0", "cuda:1"]
    untied = balanced_device_map(model, devices)
    assert [str(untied[f"model.layers.{i}"]) for i in range(6)] == ["cuda:0"] * 3 + ["cuda:1"] * 3
    tied = balanced_device_map(_meta_model(num_layers=6, tied=True), devices)
    assert str(tied["lm_head"]) == "cuda:0" and str(tied["model.norm"]) == "cuda:1"
    few = balanced_device_map(_meta_model(num_layers=2), [f"cuda:{i}" for i in range(4)])
    assert [str(few[f"model.layers.{i}"]) for i in range(2)] == ["cuda:1", "cuda:2"]


def test_load_model_balanced_loads_through_the_device_map(tmp_path, monkeypatch):
    """The real loading path (from_pretrained with the balanced map), on two CPU 'devices': same logits."""
    from tyr import models

    folder = save_tiny_checkpoint(tmp_path / "m", "qwen2", num_layers=4)
    resolved = ResolvedModel(str(folder), str(folder), str(folder))
    cpu = torch.device("cpu")
    single = load_model(resolved, torch.float32, cpu)
    maps, load = [], models._from_pretrained
    monkeypatch.setattr(models, "_from_pretrained", lambda *a, **kw: maps.append(kw) or load(*a, **kw))
    balanced = load_model(resolved, torch.float32, cpu, placement="balanced", devices=[cpu, cpu])
    assert maps[0]["device_map"] == {k: "cpu" for k in balanced_device_map(single, [cpu, cpu])}
    assert {"model.embed_tokens", "model.layers.3", "model.norm", "lm_head"} <= set(maps[0]["device_map"])
    tokens = random_tokens(2, 12)
    with torch.inference_mode():
        assert torch.equal(single(tokens).logits, balanced(tokens).logits)


def test_a_placement_without_effect_warns_and_loads_single(caplog):
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="tyr.models"):
        assert resolve_placement("offload", cpu) == "single"
        assert (
            resolve_placement("balanced", torch.device("cuda"), devices=[torch.device("cuda:0")]) == "single"
        )
    assert (
        "offload has no effect on the CPU" in caplog.text
        and "balanced has no effect with 1 GPU" in caplog.text
    )
    assert resolve_placement("offload", torch.device("cuda")) == "offload"
    with pytest.raises(TyrError, match="placement"):
        resolve_placement("spread", cpu)


# --------------------------------------------------------------------------------- lending a block (meta)
def test_on_device_lends_copies_and_gives_the_originals_back():
    """On the meta device (a second device every PyTorch has): inside, every tensor of the block is a copy on
    the device (a shared module's tensors once); after, the very same host tensors are back, unchanged."""
    model = tiny_model("qwen3", num_layers=1)
    block = model.model.layers[0]
    before = {n: (t, t.clone()) for n, t in (*block.named_parameters(), *block.named_buffers())}
    block.mlp.extra = block.self_attn.q_norm  # the same module reachable twice
    with on_device(block, "meta") as lent:
        assert lent is block
        assert all(p.device.type == "meta" for p in block.parameters())
        assert block.mlp.extra.weight is block.self_attn.q_norm.weight
        assert isinstance(block.self_attn.q_proj.weight, nn.Parameter)
    del block.mlp.extra
    for name, t in (*block.named_parameters(), *block.named_buffers()):
        original, value = before[name]
        assert t is original and torch.equal(t, value)


def test_offloaded_blocks_come_back_after_a_forward_and_after_an_error():
    """offload_blocks on meta: embedding, rotary table and head move, blocks stay; running a block (meta
    arithmetic: shapes only) lends it and gives it back, also when its forward raises half-way."""
    model = tiny_model("llama_gqa", num_layers=2)
    blocks = [dict(b.named_parameters()) for b in model.model.layers]
    offload_blocks(model, torch.device("meta"))
    assert (
        model.model.embed_tokens.weight.device.type == "meta" and model.lm_head.weight.device.type == "meta"
    )
    h = torch.zeros(1, 5, 48, device="meta")  # (B, T, d)
    position_embeddings = model.model.rotary_emb(h, torch.arange(5, device="meta")[None])
    seen = []
    model.model.layers[0].mlp.register_forward_pre_hook(
        lambda m, a: seen.append(m.up_proj.weight.device.type)
    )
    with torch.inference_mode():
        out = model.model.layers[0](h, position_embeddings=position_embeddings, attention_mask=None)
    assert seen == ["meta"] and out.shape == h.shape

    def fail(*_):
        raise RuntimeError("interrupted")

    model.model.layers[1].mlp.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="interrupted"), torch.inference_mode():
        model.model.layers[1](h, position_embeddings=position_embeddings, attention_mask=None)
    for block, params in zip(model.model.layers, blocks, strict=True):
        assert all(p is params[n] and p.device.type == "cpu" for n, p in block.named_parameters())


def test_the_realiser_refuses_placeholder_weights():
    model = tiny_model("llama_gqa", num_layers=1)
    model.model.layers[0].mlp.to("meta")
    with pytest.raises(TyrError, match="accelerate"):
        Realiser(model, mode="compact")


# ------------------------------------------------------------------------------------------------ config
def test_placement_is_a_config_key_outside_the_run_identity():
    cfg = resolve_config(None, ["schedule=smoke", "model.placement=offload"])
    assert cfg.model.placement == "offload"
    assert "placement" not in identity_dict(cfg)["model"]
    bad = RunConfig()
    bad.model.placement = "spread"
    with pytest.raises(TyrError, match="model.placement"):
        bad.validate()


def test_open_session_passes_the_placement(monkeypatch):
    from tyr import pipeline

    seen = {}

    def fake_load(resolved, dtype, device, placement="single", devices=None):
        seen["placement"] = placement
        raise TyrError("stop here")

    monkeypatch.setattr(pipeline, "load_model", fake_load)
    monkeypatch.setattr(pipeline, "resolve_model", lambda name: ResolvedModel(name, name, name))
    cfg = resolve_config(None, ["schedule=smoke", "model.placement=balanced", "model.device=cpu"])
    with pytest.raises(TyrError, match="stop here"):
        pipeline.open_session(cfg, progress=False)
    assert seen == {"placement": "balanced"}


# ---------------------------------------------------------------------------------- mock multi-device
@pytest.mark.slow
def test_every_stage_on_mock_devices_equals_single(tmp_path):
    """Offload (blocks in host RAM, the rest on mockgpu:0) and balanced (mockgpu:0..2, embedding and head on
    different devices, spread by the Ray worker's code): builder, teacher, perplexity, sparse KL and the
    realiser (compact and masked) give bitwise the single-device numbers, for Qwen3 (q/k norms shared with the
    compact attention) and Qwen2 (biases). Runs in a subprocess: the mock device's registration is process-wide."""
    code = f"from tests.test_placement import _mock_device_checks; _mock_device_checks({str(tmp_path)!r})"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "mock devices: ok" in done.stdout


# The rest runs inside the subprocess only.
class _MockTensor(torch.Tensor):
    """CPU data (`payload`) that reports a mock device; only `_MockDevices` computes with it."""

    @staticmethod
    def __new__(cls, payload: torch.Tensor, device: torch.device):
        t = torch.Tensor._make_wrapper_subclass(
            cls,
            payload.shape,
            strides=payload.stride(),
            storage_offset=payload.storage_offset(),
            dtype=payload.dtype,
            device=device,
            requires_grad=payload.requires_grad,
        )
        t.payload = payload
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a mock-device tensor outside _MockDevices")


_CROSS_DEVICE_OPS = ("aten::copy_", "aten::_to_copy", "aten::to")  # allowed between devices, as on CUDA
_CPU = torch.device("cpu")


def _unwrap(x, seen: set, targets: list):
    """x with mock tensors replaced by their CPU data and devices by the CPU; records devices met."""
    if isinstance(x, _MockTensor):
        seen.add(x.device)
        return x.payload
    if isinstance(x, torch.Tensor):
        if x.dim() > 0:  # CUDA accepts 0-dim CPU tensors beside its own
            seen.add(x.device)
        return x
    if isinstance(x, torch.device):
        targets.append(x)
        return _CPU
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, seen, targets) for v in x)
    return x


def _mock_dispatch_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class _MockDevices(TorchDispatchMode):
        """Runs every op on the CPU data; refuses ops that mix devices; results report their device."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen, targets = set(), []
            plain_args = _unwrap(args, seen, targets)
            plain_kwargs = {k: _unwrap(v, seen, targets) for k, v in (kwargs or {}).items()}
            if len(seen) > 1 and func._schema.name not in _CROSS_DEVICE_OPS:
                raise RuntimeError(
                    f"Expected all tensors to be on the same device ({func}: {sorted(map(str, seen))})"
                )
            device = targets[0] if targets else (next(iter(seen)) if len(seen) == 1 else _CPU)
            out = func(*plain_args, **plain_kwargs)
            inputs = [a for a in args if isinstance(a, torch.Tensor)]
            return _wrap(out, inputs, device, bool(targets))

    return _MockDevices()


def _wrap(y, inputs: list, device: torch.device, moved: bool):
    if isinstance(y, (list, tuple)):
        return type(y)(_wrap(v, inputs, device, moved) for v in y)
    if not isinstance(y, torch.Tensor):
        return y
    for a in inputs:  # in-place ops and no-op moves return their input
        if y is a or (isinstance(a, _MockTensor) and y is a.payload):
            if a.device == device or not moved:
                return a
            y = y.clone()
            break
    return _MockTensor(y, device) if device.type != "cpu" else y


def _mock_factory_mode():
    """torch.tensor / torch.as_tensor build their data outside the dispatcher: build on the CPU, then move."""
    from torch.overrides import TorchFunctionMode

    class _MockFactories(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            device = kwargs.get("device")
            if func in (torch.tensor, torch.as_tensor) and device is not None:
                kwargs["device"] = "cpu"
                return func(*args, **kwargs).to(device)
            return func(*args, **kwargs)

    return _MockFactories()


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.safetensors"))
    }


def _stage_numbers(model, tokens, directory: Path, offload: str) -> dict:
    """What every stage computes on `model`: a supernet's bytes, teacher targets, perplexity, and the KL and
    perplexity of a realised genome (compact, masked), with targets in memory and read back from disk."""
    from tyr.evaluators.kl import sparse_kl, sparse_kl_targets
    from tyr.evaluators.perplexity import nll_sum_and_count
    from tyr.evaluators.teacher import compute_and_save_teacher_targets, compute_teacher_targets
    from tyr.supernet.builder import BuildPlan, Offload, build_supernet
    from tyr.supernet.families import adapter_for
    from tyr.supernet.ladder import make_ladder
    from tyr.supernet.pruner import PrunerOptions
    from tyr.supernet.store import SupernetStore
    from tyr.supernet.variant import genes_of

    adapter = adapter_for(model)
    genes = genes_of(adapter.num_layers)
    where: list[set] = [set() for _ in range(adapter.num_layers)]  # devices each block computed on
    for i in range(adapter.num_layers):
        adapter.layer(i).mlp.gate_proj.register_forward_pre_hook(
            lambda m, args, i=i: where[i].add((m.weight.device, args[0].device))
        )
    ladders = [make_ladder(g, adapter.num_units(g.kind), adapter.num_units(g.kind) // 2, 2, 3) for g in genes]
    plan = BuildPlan(
        ladders, attn_options=PrunerOptions(num_rounds=2), mlp_options=PrunerOptions(num_rounds=2)
    )
    store = SupernetStore.create_or_resume(directory / "supernet", {"test": 1})
    build_supernet(model, adapter, tokens, plan, store, progress=False, offload=Offload(offload))
    out = {"supernet": _digests(directory / "supernet")}
    out["teacher"] = compute_teacher_targets(model, tokens, k=7, batch_size=3)
    out["nll"] = nll_sum_and_count(model, tokens, batch_size=3)
    targets = compute_and_save_teacher_targets(model, tokens, 7, directory / "teacher", batch_size=3)
    variants = [store.variant(g, store.ladder(g).levels[(g.layer + (g.kind == "mlp")) % 3]) for g in genes]
    for realise in ("compact", "masked"):
        realiser = Realiser(model, adapter, realise)
        realiser.apply(variants)
        for i, lent in enumerate(where):  # slices and re-fitted weights sit beside their dense block
            layer = adapter.layer(i)
            lent.add(tuple({layer.self_attn.o_proj.weight.device, layer.mlp.down_proj.weight.device}))
        out[f"kl-{realise}"] = sparse_kl(model, tokens, *out["teacher"], batch_size=3)
        out[f"kl-{realise}-stored"] = sparse_kl_targets(model, tokens, targets, [4, 0, 2], num_positions=9)
        out[f"nll-{realise}"] = nll_sum_and_count(model, tokens, batch_size=2)
        realiser.restore_dense()
    return out, where


def _assert_same(got: dict, want: dict, where: str) -> None:
    for key, value in want.items():
        if isinstance(value, tuple) and isinstance(value[0], torch.Tensor):
            same = all(torch.equal(a, b) for a, b in zip(got[key], value, strict=True))
        else:
            same = got[key] == value
        assert same, f"{where}: {key} differs: {got[key]} vs {value}"


def _mock_device_checks(tmp: str) -> None:
    """Single on the CPU, then offload and balanced on mock devices: the same numbers (run in a subprocess)."""
    import warnings

    import torch.nn.functional as F
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    from tyr.models import dispatch_balanced

    warnings.simplefilter("ignore")  # autocast's note that it is disabled for an unknown device type
    _setup_privateuseone_for_python_backend("mockgpu")
    # module.to() then makes new Parameters holding mock tensors (their data cannot be set in place)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    devices = [torch.device("mockgpu", i) for i in range(3)]
    tokens = random_tokens(5, 16)
    for family in ("qwen3", "qwen2"):
        directory = Path(tmp) / family
        dense = tiny_model(family, num_layers=3)
        if family == "qwen2":  # tied head: with the embedding on mockgpu:0, away from the last block's output
            dense.config.tie_word_embeddings = True
            dense.lm_head.weight = dense.model.embed_tokens.weight
        want, _ = _stage_numbers(copy.deepcopy(dense), tokens, directory / "single", "none")
        with _mock_factory_mode(), _mock_dispatch_mode():
            # negative control: the mock refuses what a GPU refuses
            logits = torch.zeros(4, 101, device=devices[2])
            labels = torch.zeros(4, dtype=torch.long, device=devices[0])
            try:
                F.cross_entropy(logits, labels)
            except RuntimeError as e:
                assert "same device" in str(e)
            else:
                raise AssertionError("the mock accepted tensors on two devices")

            offloaded = copy.deepcopy(dense)
            host_blocks = [dict(b.named_parameters()) for b in offloaded.model.layers]
            offload_blocks(offloaded, devices[0])
            assert offloaded.lm_head.weight.device == devices[0]
            got, where = _stage_numbers(offloaded, tokens, directory / "offload", "host")
            _assert_same(got, want, "offload")
            lent = {
                (devices[0], devices[0]),
                (torch.device("cpu"),),
            }  # computed on the device, realised on the host
            assert all(w == lent for w in where), where
            for block, params in zip(offloaded.model.layers, host_blocks, strict=True):  # and given back
                assert all(p is params[n] and p.device.type == "cpu" for n, p in block.named_parameters())

            balanced = dispatch_balanced(copy.deepcopy(dense), devices)
            assert balanced.model.embed_tokens.weight.device == devices[0]
            assert balanced.lm_head.weight.device == devices[0 if family == "qwen2" else 2]
            homes = [next(block.parameters()).device for block in balanced.model.layers]
            assert homes == [devices[0], devices[1], devices[2]], homes
            got, where = _stage_numbers(balanced, tokens, directory / "balanced", "none")
            _assert_same(got, want, "balanced")
            assert where == [{(home, home), (home,)} for home in homes], (
                where
            )  # blocks computed where they live
    print("mock devices: ok")
