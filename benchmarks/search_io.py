"""Search I/O per generation: variant bytes read, files hashed, teacher bytes, genes swapped — before and after.

A 32-block tiny random Llama (32 blocks = Llama-3.1-8B's 64 genes; random weights, built with transformers),
its supernet (9 levels per gene) and the paper's stage structure scaled to seq_len 64: 128 offspring, stages
(16, 32 tokens = half a sequence), (4, 4 sequences), (1, 32 sequences). The variant cache is half a genome's
bytes, the ratio of the 1 GiB cache to an 8B genome (2.25 GiB). Three fitness backends run the same search
(same seed; the benchmark checks they choose the same parents with the same fitness, bitwise):

* before: the evaluator as it was: every gene's variant fetched for every candidate through the LRU (which
  misses, so each fetch reads and re-hashes the file), the teacher rows read again for every candidate,
  candidates in call order.
* after (cache = half a genome): only changed genes loaded and swapped, nearest-genome order, teacher rows once
  per batch, each file hashed once.
* after (auto cache): the same with `search.variant_cache_bytes` unset: the whole supernet stays resident.

    python -m benchmarks.search_io [--generations 3] [--offspring 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks.common import markdown_table, write_results
from tyr.evaluators.kl import sparse_kl_targets
from tyr.evaluators.teacher import compute_and_save_teacher_targets
from tyr.search.batch import Batch
from tyr.search.evaluator import SerialEvaluator
from tyr.search.evolution import EvolutionConfig, Stage
from tyr.search.space import GeneLadder, SearchSpace, budget_for_start
from tyr.search.state import evolve
from tyr.supernet.builder import BuildPlan, build_supernet
from tyr.supernet.families import adapter_for
from tyr.supernet.ladder import centre_for_sparsity, make_ladder, step_units
from tyr.supernet.pruner import PrunerOptions
from tyr.supernet.store import SupernetStore
from tyr.supernet.variant import genes_of

NUM_LAYERS, SEQ_LEN, NUM_SEQUENCES, TOPK = 32, 64, 32, 32


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """32 blocks, hidden 64, 8 query heads of 8 dims (4 KV heads), MLP 128 channels, vocab 256; fp32."""
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    return model.eval()


def build(work: Path, model, tokens) -> SupernetStore:
    adapter = adapter_for(model)
    ladders = []
    for gene in genes_of(adapter.num_layers):
        n = adapter.num_units(gene.kind)
        multiple = 1 if gene.kind == "attn" else 16
        centre, step = centre_for_sparsity(n, 0.5, multiple), step_units(n, 0.125, 1, multiple)
        ladders.append(make_ladder(gene, n, centre, step, 9))
    fingerprint = {"benchmark": "search_io", "ladders": [[ld.gene.name, list(ld.levels)] for ld in ladders]}
    store = SupernetStore.create_or_resume(work / "supernet", fingerprint)
    plan = BuildPlan(ladders, mlp_options=PrunerOptions(num_rounds=4), batch_size=8)
    build_supernet(model, adapter, tokens, plan, store, progress=False)
    return store


def search_space(store: SupernetStore) -> SearchSpace:
    ladders = []
    for gene in genes_of(NUM_LAYERS):
        ladder, entries = store.ladder(gene), {e.level: e for e in store.level_entries(gene)}
        kept = tuple(ladder.num_units - ladder.removed(lv) for lv in ladder.levels)
        ladders.append(
            GeneLadder(gene, ladder.levels, kept, tuple(entries[lv].params for lv in ladder.levels))
        )
    return SearchSpace(ladders, budget_for_start(ladders, (0,) * len(ladders), "per_type"))


class BeforeStore(SupernetStore):
    """The store as it was: every read of a file hashes it (nothing is remembered as verified)."""

    def _read_variant(self, gene, entry, must_hash=False):
        self._hashed.discard(entry.file)
        return super()._read_variant(gene, entry, must_hash=True)


class BeforeEvaluator(SerialEvaluator):
    """The evaluator as it was: all genes fetched per candidate, teacher rows per candidate, call order."""

    def apply(self, genome) -> None:
        self.realiser.apply([self.store.variant(g, lv) for g, lv in zip(self.genes, genome, strict=True)])

    def __call__(self, genomes, batch: Batch) -> list[float]:
        out = []
        for genome in genomes:
            self.apply(genome)
            out.append(
                sparse_kl_targets(
                    self.model,
                    self.tokens,
                    self.targets,
                    batch.sequences,
                    batch_size=self.batch_size,
                    num_positions=batch.num_positions,
                )  # fmt: skip
            )
        return out


def run(name: str, evaluator: SerialEvaluator, space, config, work: Path) -> list[dict]:
    d = work / name
    t0 = time.perf_counter()
    evolve(
        space, config, evaluator, (0,) * space.num_genes, 1, d / "state.json", d / "history.jsonl", {},
        num_sequences=NUM_SEQUENCES, seq_len=SEQ_LEN,
    )  # fmt: skip
    evaluator.close()
    print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--offspring", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = tiny_llama()
        tokens = torch.randint(0, 256, (NUM_SEQUENCES, SEQ_LEN), generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        store = build(work, model, tokens)
        targets = compute_and_save_teacher_targets(model, tokens, TOPK, work / "teacher", batch_size=8)
        print(f"supernet + teacher: {time.perf_counter() - t0:.1f} s", flush=True)
        genome_bytes = sum(store.level_entry(g, 0).bytes for g in genes_of(NUM_LAYERS))
        supernet_bytes = store.total_bytes()
        cache = genome_bytes // 2
        space = search_space(store)
        config = EvolutionConfig(
            num_generations=args.generations,
            num_offspring=args.offspring,
            stages=(Stage(16, SEQ_LEN // 2), Stage(4, 4 * SEQ_LEN), Stage(1, 32 * SEQ_LEN)),
        )
        adapter = adapter_for(model)
        fresh = {"model": model, "adapter": adapter, "targets": targets, "tokens": tokens, "batch_size": 8}

        def store_of(cls=SupernetStore) -> SupernetStore:
            return cls.open(work / "supernet", hash_files=True)

        before = BeforeEvaluator(store=store_of(BeforeStore), **fresh)
        before.store.set_cache_bytes(cache)
        histories = {
            "before (all genes, LRU = genome/2)": run("before", before, space, config, work),
            "after (changed genes, LRU = genome/2)": run(
                "after",
                SerialEvaluator(store=store_of(), variant_cache_bytes=cache, **fresh),
                space,
                config,
                work,
            ),
            "after (auto: resident)": run(
                "resident", SerialEvaluator(store=store_of(), **fresh), space, config, work
            ),
        }
    paths = {name: [(h["parent"], h["fitness"]) for h in hist] for name, hist in histories.items()}
    if len({json.dumps(p) for p in paths.values()}) != 1:
        raise SystemExit("the three backends chose different parents or fitness: realisation is not exact")
    evaluations = histories[next(iter(histories))][0]["num_evaluations"]
    rows, results = [], {}
    for name, hist in histories.items():
        results[name] = [{"generation": h["generation"], "seconds": h["seconds"], **h["io"]} for h in hist]
        for h in hist:
            io = h["io"]
            rows.append([
                name, h["generation"], round(io["variant_bytes_read"] / 2**20, 2), io["num_variant_files_hashed"],
                round(io["teacher_bytes_read"] / 2**20, 2), io["num_genes_swapped"], round(h["seconds"], 1),
            ])  # fmt: skip
    print(
        f"{NUM_LAYERS} blocks ({2 * NUM_LAYERS} genes), genome {genome_bytes / 2**20:.2f} MiB, supernet "
        f"{supernet_bytes / 2**20:.2f} MiB, cache {cache / 2**20:.2f} MiB; {evaluations} evaluations per generation"
    )
    headers = ["backend", "gen", "variant MiB read", "files hashed", "teacher MiB read", "genes swapped", "s"]
    print(markdown_table(headers, rows))
    payload = {
        "num_layers": NUM_LAYERS,
        "genome_bytes": genome_bytes,
        "supernet_bytes": supernet_bytes,
        "cache_bytes": cache,
        "evaluations_per_generation": evaluations,
        "stages": [[s.num_survivors, s.num_tokens] for s in config.stages],
        "seq_len": SEQ_LEN,
        "generations": results,
    }
    print(f"wrote {write_results('search_io', payload)}")


if __name__ == "__main__":
    main()
