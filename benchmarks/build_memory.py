"""Supernet build memory per offload mode (`supernet.offload`) and calibration-set size.

A random Llama (hidden 512, MLP 2048, 8 heads / 2 KV heads, 4 blocks, vocabulary 4096; built from a
LlamaConfig, nothing downloaded) is built into a supernet on N = 16, 64, 256 sequences of 256 tokens with every
offload mode. Each configuration runs in a fresh subprocess, which reports:

* the builder's device ledger (supernet/ledger.py): peak bytes held on the compute device per phase
  (capture = pass 1, prune = the local pruner, propagate = pass 2); the model's weights are not in it;
* the peak *anonymous* RSS (`RssAnon` of /proc/self/status, sampled every 2 ms in a thread) minus its value just
  before the build (after the imports, the model and the tokens). `VmHWM` would also count file-backed pages,
  i.e. the memory-mapped hidden states of `disk`, which the OS can write out and drop;
* a `planned_device_bytes` field, None for now: the prediction of `tyr plan` goes there.

Expected: the device part is flat in N for host and disk, RssAnon is flat in N for disk.

    python -m benchmarks.build_memory [--sizes 16,64,256] [--modes none,host,disk]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import markdown_table, write_results

SEQ_LEN = 256
MIB = 2**20


def rss_anon_bytes() -> int:
    """RssAnon of this process (anonymous pages only: heap, pinned buffers; not mapped files)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakSampler:
    """Samples RssAnon in a thread; `peak` is the highest value seen since `start`."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self.peak = rss_anon_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def random_llama():
    """The benchmark's model: random weights, fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def measure(mode: str, num_sequences: int) -> dict:
    """One configuration, in this process: build the supernet, return the ledger and the RssAnon peak."""
    import torch

    from tyr import pipeline
    from tyr.config import resolve_config
    from tyr.supernet.builder import Offload, build_supernet
    from tyr.supernet.families import adapter_for
    from tyr.supernet.store import SupernetStore

    torch.set_num_threads(2)
    cfg = resolve_config(None, ["sparsity=0.5", "supernet.batch_size=8"])
    model = random_llama()
    adapter = adapter_for(model)
    tokens = torch.randint(0, 4096, (num_sequences, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    ladders = pipeline.plan_ladders(
        adapter,
        pipeline.uniform_centres(adapter, cfg),
        pipeline.iteration_steps(adapter, cfg, 1),
        cfg.supernet.num_levels,
    )
    with tempfile.TemporaryDirectory(prefix="tyr-build-memory-") as work:
        store = SupernetStore.create_or_resume(Path(work) / "supernet", {"benchmark": "build_memory"})
        offload = Offload(mode, Path(work) / "offload")
        baseline = rss_anon_bytes()
        t0 = time.perf_counter()
        with PeakSampler() as sampler:
            report = build_supernet(
                model, adapter, tokens, pipeline.build_plan(cfg, ladders), store, False, offload
            )
        seconds = time.perf_counter() - t0
    ledger = report.ledger
    planned = planned_terms(mode, num_sequences, model)
    return {
        "mode": mode,
        "num_sequences": num_sequences,
        "seq_len": SEQ_LEN,
        "device_peak_bytes": ledger["peak_bytes"],
        "device_peak_bytes_by_phase": ledger["peak_bytes_by_phase"],
        "planned_device_bytes": planned["ledger"],  # `tyr plan`'s device working set (ledger terms)
        # what `tyr plan` puts in RAM for a CPU build besides the weights: the device's working set at its
        # peak (the ledger, plus a module's forward over a chunk where one runs) and offload host's hidden states
        "planned_rss_bytes": planned["working"] + planned["hidden_host"],
        "rss_anon_baseline_bytes": baseline,
        "rss_anon_peak_bytes": sampler.peak - baseline,
        "seconds": seconds,
    }


def planned_terms(mode: str, num_sequences: int, model) -> dict[str, int]:
    """`tyr plan`'s build terms for this configuration (tyr/plan.py), planned for a CPU build of `model`."""
    from tyr.config import resolve_config
    from tyr.plan import build_terms, plan_context

    cfg = resolve_config(
        None,
        [
            "sparsity=0.5",
            "supernet.batch_size=8",
            f"supernet.offload={mode}",
            f"data.num_sequences={num_sequences}",
            f"data.seq_len={SEQ_LEN}",
            "model.dtype=float32",
        ],
    )
    return build_terms(plan_context(cfg, "cpu", model))


# glibc's malloc raises its mmap threshold as large blocks are freed, after which chunk-sized buffers (a few
# MiB) come from its heap and their pages stay resident when freed: at N=256 with offload none the measured
# peak was 1.40x the live bytes (1313 vs 938 MiB). A fixed threshold returns freed buffers to the OS, so the
# measurement counts what the build holds; --glibc-default measures the allocator's own behaviour instead.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def run_subprocess(mode: str, num_sequences: int, glibc_default: bool = False) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.build_memory", "--worker", mode, str(num_sequences)]
    env = dict(os.environ) if glibc_default else {**os.environ, **FIXED_MMAP_THRESHOLD}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    def mib(n: int | None) -> str:
        return "—" if n is None else f"{n / MIB:.1f}"

    headers = [
        "offload",
        "N",
        "device: capture MiB",
        "device: prune MiB",
        "device: propagate MiB",
        "device: planned (tyr plan)",
        "RssAnon peak - baseline MiB",
        "RssAnon planned MiB",
        "measured / planned",
        "wall s",
    ]
    body = [
        [
            r["mode"],
            r["num_sequences"],
            *(mib(r["device_peak_bytes_by_phase"][p]) for p in ("capture", "prune", "propagate")),
            mib(r["planned_device_bytes"]),
            mib(r["rss_anon_peak_bytes"]),
            mib(r["planned_rss_bytes"]),
            f"{r['rss_anon_peak_bytes'] / r['planned_rss_bytes']:.2f}",
            f"{r['seconds']:.1f}",
        ]
        for r in rows
    ]
    return markdown_table(headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256", help="numbers of calibration sequences")
    parser.add_argument("--modes", default="none,host,disk")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold (see the comment)"
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]))))
        return
    rows = []
    for mode in args.modes.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(run_subprocess(mode, n, args.glibc_default))
            print(f"[build_memory] {mode} N={n}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    print(table(rows))
    path = write_results(
        "build_memory",
        {
            "model": "random Llama: hidden 512, MLP 2048, 8 heads (2 KV), 4 blocks, vocab 4096, fp32, CPU",
            "seq_len": SEQ_LEN,
            "rss": "RssAnon peak during the build minus RssAnon just before it (imports, model, tokens loaded)",
            "malloc": "glibc default" if args.glibc_default else "MALLOC_MMAP_THRESHOLD_=131072 (fixed)",
            "rows": rows,
        },
    )
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
