"""The digest of large files (teacher targets: 192 GiB at the paper setting): one-core sha256 against the blocked
digest Tyr writes now (`tyr.io.blocked_sha256_file`: 256 MiB blocks hashed by all cores).

Writes a `--gib` GiB file of random bytes into a temporary folder, reads it once so it sits in the page cache
(the timings are then hashing speed, the part the cores change; on a cold file the disk's read speed bounds
both), and times `sha256_file` and `blocked_sha256_file` with 1 thread and with every core, `--repeats` times
each (the median is kept).

    python -m benchmarks.file_digest [--gib 2] [--repeats 3]

Prints a table and writes `benchmarks/results/file_digest.json`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, timed, write_results  # noqa: E402
from tyr.io import BLOCK_DIGEST_BYTES, blocked_sha256_file, sha256_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=2.0, help="file size in GiB (2)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per method; the median is kept (3)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    size = int(args.gib * 2**30)
    with tempfile.TemporaryDirectory(prefix="tyr-digest-") as folder:
        path = Path(folder) / "data.bin"
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:
            for start in range(0, size, 1 << 26):
                f.write(rng.integers(0, 256, min(1 << 26, size - start), dtype=np.uint8).tobytes())
        sha256_file(path)  # into the page cache
        rows = []
        for name, fn in (
            ("sha256 (one core, earlier releases)", lambda: sha256_file(path)),
            ("blocked, 1 thread", lambda: blocked_sha256_file(path, threads=1)),
            (f"blocked, {cores} threads (Tyr's default)", lambda: blocked_sha256_file(path)),
        ):
            seconds, _ = timed(fn, args.repeats)
            rows.append({"method": name, "seconds": seconds, "gb_per_s": size / seconds / 1e9})
    base = rows[0]["seconds"]
    print(
        markdown_table(
            ["method", "seconds", "GB/s", "speed-up"],
            [[r["method"], r["seconds"], r["gb_per_s"], base / r["seconds"]] for r in rows],
        )
    )
    at_scale = 192 * 2**30
    payload = {
        "file_bytes": size,
        "block_bytes": BLOCK_DIGEST_BYTES,
        "cores": cores,
        "cached": True,
        "rows": rows,
        "paper_targets_minutes_at_these_rates": {
            r["method"]: at_scale / (r["gb_per_s"] * 1e9) / 60 for r in rows
        },
    }
    print(f"\nwritten {write_results('file_digest', payload)}")


if __name__ == "__main__":
    main()
