"""The model card (``README.md``) of an export: YAML front matter for the hub, a short Markdown description.

Every string that comes from a run's files (base model name, eval data name, ...) is escaped before it enters the
Markdown body, so that it can neither break the tables nor inject HTML.
"""

from __future__ import annotations

import html
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

TAGS = ("pruned", "structured-pruning", "tyr")
LICENSE_KEYS = ("license", "license_name", "license_link")  # license_name/_link go with `license: other`
_MARKDOWN_SPECIAL = re.compile(r"[\\`*_\[\]|~#]")


def markdown_escape(text: object) -> str:
    """``text`` as literal inline Markdown: whitespace (newlines included) collapsed to single spaces, ``&<>`` as
    HTML entities, and Markdown punctuation (``|`` ends a table cell, backticks open code) backslash-escaped."""
    flat = " ".join(str(text).split())
    return _MARKDOWN_SPECIAL.sub(lambda m: "\\" + m.group(0), html.escape(flat, quote=False))


def hub_name(base: str) -> str:
    """What the hub's ``base_model`` can hold: a hub id as given, a local folder by its name only."""
    local = base.startswith((".", "/", "~")) or base.count("/") > 1 or os.sep != "/" and os.sep in base
    return Path(base).name if local else base


# ---------------------------------------------------------------------------------------------- license
def read_front_matter(text: str) -> dict:
    """The YAML front matter of a model card (``{}`` when there is none or it does not parse)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    for end in range(1, len(lines)):
        if lines[end].strip() == "---":
            try:
                data = yaml.safe_load("\n".join(lines[1:end]))
            except yaml.YAMLError:
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def base_license(candidates: Iterable[str | os.PathLike | None]) -> dict[str, str]:
    """The license keys of the base model's own card: the first candidate (a local folder, or a hub id whose
    README.md is already in the local Hugging Face cache; nothing is downloaded) whose card names a license."""
    for candidate in candidates:
        card = _local_card(candidate)
        if card is None:
            continue
        try:
            meta = read_front_matter(card.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        found = {k: meta[k] for k in LICENSE_KEYS if isinstance(meta.get(k), str) and meta[k].strip()}
        if "license" in found:
            return found
    return {}


def _local_card(candidate: str | os.PathLike | None) -> Path | None:
    if not candidate:
        return None
    path = Path(candidate).expanduser()
    if path.is_dir():
        return path / "README.md" if (path / "README.md").is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(str(candidate), "README.md")
    except ValueError:  # not a hub id (huggingface_hub's validation error)
        return None
    return Path(cached) if isinstance(cached, str) else None


# ------------------------------------------------------------------------------------------------- card
def front_matter(architecture: dict, license: dict[str, str]) -> dict:
    """The hub metadata of the export (license keys only when the base model's are known)."""
    meta: dict = {}
    base = architecture.get("base_model")
    if isinstance(base, str) and base.strip():
        meta["base_model"] = hub_name(base.strip())
    if license:
        meta.update(license)
    else:
        logger.warning(
            "the base model's license is unknown (no license in its local model card); the exported "
            "README.md has none: add it before publishing"
        )
    meta.update(library_name="transformers", pipeline_tag="text-generation", tags=list(TAGS))
    return meta


def model_card(
    architecture: dict,
    metrics: dict | None,
    fmt: str,
    remote: bool,
    config: dict,
    license: dict[str, str] | None = None,
) -> str:
    """README.md: front matter, what was pruned, measured quality, usage and the per-layer structure."""
    meta = front_matter(architecture, license or {})
    base = architecture.get("base_model")
    name = markdown_escape(hub_name(str(base))) if base else "an unnamed model"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += _summary(architecture, name, fmt, remote)
    if metrics:
        lines += _metrics_section(metrics)
    lines += _usage(remote)
    lines += _structure(architecture, config, dense_counts=fmt != "hf" or remote)
    return "\n".join(lines)


def _summary(architecture: dict, name: str, fmt: str, remote: bool) -> list[str]:
    params = architecture.get("params", {})
    if fmt == "hf":
        how = (
            "compact weights; per-layer shapes need `trust_remote_code=True` (or `tyr.load_pruned`)"
            if remote
            else "compact weights, stock config"
        )
    else:
        how = "original shapes, pruned weights zeroed"
    return [
        f"# {name}, structurally pruned with Tyr",
        "",
        f"Attention heads and MLP channels of {name} ({markdown_escape(architecture.get('model_type'))}) were "
        "removed by Tyr (Týr-the-Pruner: a supernet of locally pruned variants per module, re-fitted output "
        "projections, and an evolutionary search for the per-layer sparsity).",
        "",
        f"- target sparsity: {_pct(architecture.get('target_sparsity'))} of the prunable parameters "
        f"(attention and MLP projections); achieved: {_pct(architecture.get('achieved_sparsity'))}",
        f"- parameters: {_count(params.get('dense'))} dense → {_count(params.get('pruned'))} pruned "
        f"(prunable: {_count(params.get('prunable_dense'))} → {_count(params.get('prunable_pruned'))})",
        f"- format: `{fmt}` — {how}",
        "",
    ]


def _metrics_section(metrics: dict) -> list[str]:
    rows = []
    for name in ("dense", "uniform", "searched"):
        m = metrics.get(name)
        if isinstance(m, dict):
            rows.append(f"| {name} | {_num(m.get('ppl'))} | {_num(m.get('kl'), 4)} |")
    if not rows:
        return []
    data = markdown_escape(metrics.get("eval_data", "held-out data"))
    tokens = metrics.get("eval_tokens")
    topk = markdown_escape(metrics.get("topk", "K"))
    return [
        "## Measured quality",
        "",
        f"Perplexity and top-{topk} KL divergence to the dense model on {data}"
        + (f" ({tokens} tokens)" if isinstance(tokens, int) and tokens else "")
        + "; `uniform` prunes every layer equally, `searched` is this model.",
        "",
        "| model | perplexity | KL to dense |",
        "|---|---|---|",
        *rows,
        "",
    ]


def _usage(remote: bool) -> list[str]:
    trust = ", trust_remote_code=True" if remote else ""
    lines = [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{trust})',
        f'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder"{trust})',
        "```",
        "",
    ]
    if remote:
        lines += ["With tyr installed, `tyr.load_pruned(folder)` loads it without remote code.", ""]
    return lines


def _structure(architecture: dict, config: dict, dense_counts: bool) -> list[str]:
    """The per-layer table; ``dense_counts`` adds the dense model's counts (a stock config holds the pruned)."""
    dense = [config.get(k) if dense_counts else None for k in ("num_attention_heads", "num_key_value_heads")]
    dense.append(config.get("intermediate_size") if dense_counts else None)
    lines = [
        "## Per-layer structure",
        "",
        "| layer | query heads | KV heads | MLP channels |",
        "|---|---|---|---|",
    ]
    for entry in architecture.get("layers", []):
        counts = (
            len(entry["attention"]["kept_heads"]),
            len(entry["attention"]["kept_kv_heads"]),
            entry["mlp"]["kept_channels_count"],
        )
        cells = [markdown_escape(f"{n}{_of(d)}") for n, d in zip(counts, dense)]
        lines.append(f"| {markdown_escape(entry['index'])} | {' | '.join(cells)} |")
    lines += [
        "",
        "Exact kept head / channel indices (into the dense model) are in `architecture.json`.",
        "",
    ]
    return lines


def _of(dense) -> str:
    return f" / {dense}" if dense is not None else ""


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "?"


def _count(n) -> str:
    if not isinstance(n, int):
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


def _num(x, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "?"
