"""`search.fitness: kl+hidden`: the stored teacher hidden states, the fitness term against a hand computation, the
same bits with the prefix cache, validation rows scored on KL alone, and a run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_search_io import SEQ_LEN, _build, _ladders, _space
from tests.tiny import random_tokens, tiny_model
from tyr.errors import TyrError
from tyr.evaluators.hidden import TeacherHidden, compute_and_save_teacher_hidden, hidden_layers
from tyr.evaluators.kl import kl_mean, sparse_kl_sums
from tyr.evaluators.teacher import compute_and_save_teacher_targets
from tyr.search.batch import Batch
from tyr.search.evaluator import SerialEvaluator
from tyr.search.evolution import sample_offspring
from tyr.supernet.families import adapter_for


def test_hidden_layers_are_first_middle_last():
    assert hidden_layers(4) == [0, 2, 3]
    assert hidden_layers(30) == [0, 15, 29]
    assert hidden_layers(1) == [0]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hidden")
    model, tokens = tiny_model("llama_gqa", num_layers=4), random_tokens(7, SEQ_LEN, seed=3)
    adapter = adapter_for(model)
    store = _build(tmp / "supernet", model, tokens, _ladders(adapter))
    targets = compute_and_save_teacher_targets(model, tokens, 20, tmp / "teacher", batch_size=4)
    indices = hidden_layers(adapter.num_layers)
    hidden = compute_and_save_teacher_hidden(
        model, [adapter.layer(i) for i in indices], indices, tokens, tmp / "hidden", batch_size=3
    )
    return model, adapter, tokens, store, targets, hidden, tmp


def _decoder_outputs(model, ids):
    out = model.model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return out.hidden_states  # embeddings, then each block's output (the last one normed by HF)


def test_stored_hidden_states_are_the_dense_block_outputs(setting):
    model, adapter, tokens, _, _, hidden, tmp = setting
    assert hidden.layers == [0, 2, 3] and hidden.num_sequences == 7
    with torch.no_grad():
        states = _decoder_outputs(model, tokens[[5, 1]])
    rows = hidden.get([5, 1], SEQ_LEN).float()
    for j, layer in enumerate(hidden.layers[:-1]):  # HF's last entry has the final norm applied
        torch.testing.assert_close(rows[:, :, j], states[layer + 1], rtol=1e-2, atol=1e-2)
    reopened = TeacherHidden.open(tmp / "hidden", verify=True)
    assert reopened.scales == hidden.scales and all(s > 0 for s in hidden.scales)
    assert torch.equal(reopened.get([2], 5), hidden.get([2], SEQ_LEN)[:, :5])  # a prefix reads the same rows


def test_a_damaged_file_is_refused_on_verify(setting, tmp_path):
    model, adapter, tokens, *_ = setting
    hidden = compute_and_save_teacher_hidden(model, [adapter.layer(0)], [0], tokens[:2], tmp_path / "h")
    path = hidden.directory / "hidden.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TyrError, match="sha256"):
        TeacherHidden.open(tmp_path / "h", verify=True)


def test_fitness_is_kl_plus_weighted_relative_hidden_error(setting):
    model, adapter, tokens, store, targets, hidden, _ = setting
    genome = tuple(1 if g % 3 == 0 else 0 for g in range(len(_space(store).genes)))
    weight = 0.7
    batch = Batch((0, 2, 3, 6), 11)  # a prefix of 11 positions, two blocks of 3 + 1
    evaluator = SerialEvaluator(
        model, adapter, store, targets, tokens, batch_size=3, hidden=hidden, hidden_weight=weight
    )
    try:
        [value] = evaluator.evaluate([genome], batch)
        # by hand: the KL of the pruned model plus the relative squared error of the three blocks' outputs
        captured = {}
        handles = [
            adapter.layer(i).register_forward_hook(
                lambda m, a, o, i=i: captured.__setitem__(i, o[0] if isinstance(o, tuple) else o)
            )
            for i in hidden.layers
        ]
        sums = []
        for rows in ((0, 2, 3), (6,)):
            ids = tokens[list(rows), :11]
            values, indices = targets.get(rows, 11)
            kl = sparse_kl_sums(model, ids, values, indices, batch_size=3)
            teacher = hidden.get(rows, 11).double()
            error = sum(
                (captured[layer].double() - teacher[:, :, j]).pow(2).sum(dim=(1, 2)) / (48 * hidden.scales[j])
                for j, layer in enumerate(hidden.layers)
            ) / len(hidden.layers)
            sums += (kl + weight * error).tolist()
        for h in handles:
            h.remove()
    finally:
        evaluator.close()
    assert value == pytest.approx(kl_mean(sums, 11), rel=1e-6)
    plain = SerialEvaluator(model, adapter, store, targets, tokens, batch_size=3)
    try:
        [kl_only] = plain.evaluate([genome], batch)
    finally:
        plain.close()
    assert value > kl_only > 0  # the hidden term adds a positive error for a pruned model


def test_same_bits_with_the_prefix_cache_and_kl_alone_beyond_the_stored_rows(setting):
    model, adapter, tokens, store, targets, hidden, _ = setting
    space = _space(store)
    parent = (0,) * len(space.genes)
    genomes = [*sample_offspring(parent, space, np.random.default_rng(4), 6, 3), parent]

    def values(prefix_cache_bytes, hidden):
        evaluator = SerialEvaluator(
            model,
            adapter,
            store,
            targets,
            tokens,
            batch_size=3,
            prefix_cache_bytes=prefix_cache_bytes,
            hidden=hidden,
            hidden_weight=2.0,
        )
        try:
            return evaluator.evaluate(genomes, Batch(range(7)))
        finally:
            evaluator.close()

    assert values(1 << 30, hidden) == values(0, hidden) != values(0, None)
    # rows the stored states do not hold (validation windows stacked after them) are scored on KL alone
    few = TeacherHidden.open(hidden.directory)
    few.num_sequences = 4
    evaluator = SerialEvaluator(
        model, adapter, store, targets, tokens, batch_size=3, hidden=few, hidden_weight=2.0
    )
    plain = SerialEvaluator(model, adapter, store, targets, tokens, batch_size=3)
    try:
        assert evaluator.evaluate(genomes, Batch((4, 5, 6))) == plain.evaluate(genomes, Batch((4, 5, 6)))
    finally:
        evaluator.close()
        plain.close()


def test_a_run_with_kl_hidden_and_a_ray_worker_score_the_same(tiny_assets, tmp_path):
    """End to end (smoke schedule): the teacher's hidden states are stored once, the search runs on the combined
    fitness, and a Ray worker's evaluator (here in-process: the same class the actors hold) scores the same bits
    as the driver's serial one."""
    from tests.conftest import smoke_args
    from tyr import pipeline
    from tyr.cli import main
    from tyr.cluster import _shippable_config, _Worker
    from tyr.evaluators.teacher import TeacherTargets
    from tyr.run import search_evaluator
    from tyr.rundir import RunDir
    from tyr.supernet.store import SupernetStore

    out = tmp_path / "run"
    extra = ("--set", "search.fitness=kl+hidden", "--set", "search.hidden_weight=0.5")
    assert main(smoke_args(tiny_assets, out, *extra)) == 0
    run = RunDir(out)
    hidden = TeacherHidden.open(run.teacher_hidden_dir, verify=True)
    cfg = run.load_config()
    assert cfg.search.fitness == "kl+hidden" and hidden.num_sequences == cfg.data.num_sequences
    assert all(r["fitness"] > 0 for r in run.read_history(1))
    genome = tuple(run.read_result(1)["genome"])
    batch = Batch(tuple(range(cfg.data.num_sequences)))
    session = pipeline.open_session(cfg, progress=False)
    store = SupernetStore.open(run.supernet_dir(1))
    targets = TeacherTargets.open(run.teacher_dir)
    serial = search_evaluator(session, store, targets, session.calibration, hidden)
    plain = search_evaluator(session, store, targets, session.calibration, None)
    try:
        want = [serial.unit_sums(genome, batch, b) for b in ((0, 2), (2, 4))]
        kl_only = [plain.unit_sums(genome, batch, b) for b in ((0, 2), (2, 4))]
    finally:
        serial.close()
        plain.close()
    spec = {"config": _shippable_config(cfg), "run_dir": str(out), "num_threads": 1, "num_gpus": 0}
    worker = _Worker(spec)
    units = [[list(genome), 0, 2], [list(genome), 2, 4]]
    got = worker.evaluate(str(run.supernet_dir(1)), store.fingerprint_hash, units, batch.to_json())["sums"]
    assert got == want != kl_only
