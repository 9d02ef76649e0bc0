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
    return {
        "mode": mode,
        "num_sequences": num_sequences,
        "seq_len": SEQ_LEN,
        "device_peak_bytes": ledger["peak_bytes"],
        "device_peak_bytes_by_phase": ledger["peak_bytes_by_phase"],
        "planned_device_bytes": None,  # `tyr plan`'s prediction (a later step)
        "rss_anon_baseline_bytes": baseline,
        "rss_anon_peak_bytes": sampler.peak - baseline,
        "seconds": seconds,
    }


def run_subprocess(mode: str, num_sequences: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.build_memory", "--worker", mode, str(num_sequences)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
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
        "wall s",
    ]
    body = [
        [
            r["mode"],
            r["num_sequences"],
            *(mib(r["device_peak_bytes_by_phase"][p]) for p in ("capture", "prune", "propagate")),
            mib(r["planned_device_bytes"]),
            mib(r["rss_anon_peak_bytes"]),
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
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]))))
        return
    rows = []
    for mode in args.modes.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(run_subprocess(mode, n))
            print(f"[build_memory] {mode} N={n}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    print(table(rows))
    path = write_results(
        "build_memory",
        {
            "model": "random Llama: hidden 512, MLP 2048, 8 heads (2 KV), 4 blocks, vocab 4096, fp32, CPU",
            "seq_len": SEQ_LEN,
            "rss": "RssAnon peak during the build minus RssAnon just before it (imports, model, tokens loaded)",
            "rows": rows,
        },
    )
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
