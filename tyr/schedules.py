"""Schedule presets: named starting points for a run's config (YAML and --set override them).

- paper: Týr-the-Pruner's published setting (4 iterations x 50 generations, 128 offspring, stages of
  2,048 / 16,384 / 131,072 tokens, top-8192 KL, 4M calibration tokens at length 4096). GPU-days for 8B.
- cpu:   a short schedule that runs SmolLM2-135M on a 2-core laptop in about ten minutes (the demo).
- smoke: seconds on a tiny model; for tests and quick checks of a set-up.

All three select with paired comparisons and hold back validation windows (the next windows of the
calibration draw; the calibration windows themselves are those of a run without them), which pick each
iteration's result and the final model. In paper and cpu, later iterations get at least the generations and
the last-stage tokens of earlier ones (smoke keeps its (3, 2): tests read its log lines). cpu and smoke run
candidates from their first changed block (`search.prefix_cache_bytes`, measured 1.2-1.3x per generation on the
demo); paper leaves it off (device memory: set it from `tyr plan`). All three re-fit toward the dense weights
(`supernet.refit: dense`: chosen on validation KL, benchmarks/search_quality.py; criteria without a refit keep
the default). (Runs stored before these keys existed continue as they began: `tyr.config.resumed_config`.)
"""

from __future__ import annotations

import copy

from tyr.errors import TyrError

PRESETS: dict[str, dict] = {
    "paper": {
        "data": {"num_sequences": 1024, "seq_len": 4096, "num_validation_sequences": 32},
        "supernet": {
            "num_levels": 9,
            "attn_step": 0.125,
            "mlp_step": 0.125,
            "batch_size": 4,
            "refit": "dense",
        },
        "search": {
            "num_iterations": 4,
            "generations": [50, 50, 50, 50],
            "num_offspring": 128,
            "max_mutations": 4,
            "stages": [[16, 2048], [4, 16384], [1, 131072]],
            "selection": "paired",
            "validate_every": 10,
            "topk": 8192,
            "batch_size": 4,
        },
    },
    "cpu": {
        "data": {"num_sequences": 32, "seq_len": 512, "num_validation_sequences": 8},
        "supernet": {"num_levels": 9, "refit": "dense"},
        "search": {
            "num_iterations": 2,
            "generations": [5, 5],
            "num_offspring": 16,
            "max_mutations": 4,
            "stages": [[4, 512], [2, 1024], [1, 4096]],
            "selection": "paired",
            "validate_every": 2,
            "topk": 512,
            "batch_size": 8,
            "prefix_cache_bytes": 1 << 30,  # ~0.3 GiB per 8 x 512-token block on SmolLM2-135M (fp32)
        },
    },
    "smoke": {
        "data": {"num_sequences": 8, "seq_len": 32, "num_validation_sequences": 4},
        "supernet": {
            "num_levels": 5,
            "min_mlp_step": 4,
            "channel_multiple": 4,
            "mlp_rounds": 4,
            "batch_size": 4,
            "refit": "dense",
        },
        "search": {
            "num_iterations": 2,
            "generations": [3, 2],
            "num_offspring": 6,
            "max_mutations": 2,
            "stages": [[3, 64], [1, 128]],
            "selection": "paired",
            "validate_every": 1,
            "topk": 16,
            "batch_size": 4,
            "prefix_cache_bytes": 16 << 20,
        },
    },
}


def preset(name: str) -> dict:
    """A copy of the named preset's settings. TyrError for an unknown name, or a value that is no name at all
    (YAML or `--set schedule=...` can give a list or a mapping)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise TyrError(f"unknown schedule {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
