"""`tyr eval`: perplexity on held-out text and KL divergence to the base model, optionally lm-eval tasks.

``MODEL_OR_RUN`` is a finished run directory (its final model is exported to a temporary folder and loaded like
any export; the run's dense model is the base, and the run's eval settings are the defaults, so the numbers
reproduce ``final/metrics.json``), a model folder (a ``tyr export`` or any Hugging Face folder; the base comes from
its ``architecture.json`` or ``--base``), or a model name understood by ``--model`` of ``tyr run``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tyr.errors import TyrError
from tyr.logs import progress_bars

if TYPE_CHECKING:  # torch loads on first use: `tyr --help` stays fast
    import torch

DEFAULT_DATA = "lee"
DEFAULT_SEQ_LEN = 512
DEFAULT_TOPK = 512
LM_EVAL_INSTALL = "pip install lm-eval"


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    kind: str  # run | folder | model
    base: torch.nn.Module | None
    base_name: str | None
    defaults: dict  # eval defaults (data, split, seq_len, num_sequences, topk) from a run
    notes: list[str]


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        return None
    return lm_eval


def evaluate(
    target: str,
    *,
    data: str | None = None,
    data_config: str | None = None,
    split: str | None = None,
    text_field: str = "text",
    seq_len: int | None = None,
    num_sequences: int | None = None,
    base: str | None = None,
    topk: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    dtype: str = "auto",
    tasks: list[str] | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    progress: bool = False,
) -> dict:
    """Measure a pruned (or any) causal LM; returns a JSON-serialisable dict."""
    if tasks and _lm_eval() is None:
        raise TyrError(f"--tasks needs lm-evaluation-harness, which is not installed: {LM_EVAL_INSTALL}")
    if seq_len is not None and seq_len < 2:
        raise TyrError(f"--seq-len must be at least 2, got {seq_len}")
    for flag, value, minimum in (
        ("--num-sequences", num_sequences, 1),
        ("--topk", topk, 1),
        ("--batch-size", batch_size, 1),
        ("--num-fewshot", num_fewshot, 0),
    ):
        if value is not None and value < minimum:
            raise TyrError(f"{flag} must be at least {minimum}, got {value}")
    if limit is not None and not (0 < limit < float("inf")):
        raise TyrError(f"--limit must be a positive number (a count, or a fraction < 1), got {limit}")
    with ExitStack() as stack:
        loaded = _load(target, base, device, dtype, stack)
        d = loaded.defaults
        if data is None:  # a run's own held-out data (and its dataset settings), else the built-in `lee`
            data = d.get("data", DEFAULT_DATA)
            data_config = data_config if data_config is not None else d.get("data_config")
            split = split or d.get("split")
            text_field = d.get("text_field", text_field)
        seq_len = seq_len or d.get("seq_len", DEFAULT_SEQ_LEN)
        num_sequences = num_sequences if num_sequences is not None else d.get("num_sequences")
        topk = topk or d.get("topk", DEFAULT_TOPK)
        tokens = _tokens(loaded, data, data_config, split or "test", text_field, seq_len, num_sequences)

        from tyr.evaluators.kl import sparse_kl
        from tyr.evaluators.perplexity import perplexity
        from tyr.evaluators.teacher import compute_teacher_targets

        result: dict = {
            "model": str(target),
            "kind": loaded.kind,
            "data": data,
            "seq_len": int(seq_len),
            "eval_tokens": int(tokens.numel()),
            "params": _num_params(loaded.model),
            "ppl": perplexity(loaded.model, tokens, batch_size=batch_size, progress=progress),
            "base": None,
            "kl": None,
        }
        if loaded.base is not None:
            vocab = int(loaded.base.get_output_embeddings().weight.shape[0])
            k = min(int(topk), vocab)
            values, indices = compute_teacher_targets(
                loaded.base, tokens, k, batch_size=batch_size, progress=progress
            )
            result["base"] = {
                "model": loaded.base_name,
                "params": _num_params(loaded.base),
                "ppl": perplexity(loaded.base, tokens, batch_size=batch_size, progress=progress),
            }
            result["kl"] = sparse_kl(loaded.model, tokens, values, indices, batch_size=batch_size)
            result["topk"] = k
        if tasks:
            result["tasks"] = run_tasks(loaded.model, loaded.tokenizer, tasks, batch_size, num_fewshot, limit)
        if loaded.notes:
            result["notes"] = loaded.notes
        return result


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tokens(loaded: Loaded, data, data_config, split, text_field, seq_len, num_sequences) -> torch.Tensor:
    from tyr.data import TextSource, evaluation_tokens

    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise TyrError(f"--seq-len {seq_len} exceeds the model's maximum of {limit} positions")
    if loaded.tokenizer is None:
        raise TyrError("no tokenizer found next to the model; export it with its tokenizer or pass --base")
    source = TextSource(data, data_config, split, text_field)
    return evaluation_tokens(source, loaded.tokenizer, seq_len, num_sequences)


# ---------------------------------------------------------------------------------------------- loading
def _load(target: str, base: str | None, device: str, dtype: str, stack: ExitStack) -> Loaded:
    from tyr.models import resolve_device, resolve_dtype

    path = Path(target).expanduser()
    dev = resolve_device(device)
    if path.is_dir() and (path / "config.yaml").is_file():
        return _load_run(path, base, dev, dtype, stack)
    if path.is_dir() and (path / "config.json").is_file():
        from tyr.export import load_pruned

        torch_dtype = None if dtype == "auto" else resolve_dtype(dtype, dev)
        model = load_pruned(path, dtype=torch_dtype, device=dev)
        tokenizer = _try_tokenizer(str(path), model.config)
        arch = _architecture(path)
        return _with_base(model, tokenizer, "folder", base, arch, dev, dtype, [])
    if path.exists():
        raise TyrError(
            f"{target} is neither a Tyr run directory (config.yaml) nor a model folder (config.json)"
        )
    from tyr.models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model(target)
    model = load_model(resolved, resolve_dtype(dtype, dev), dev)
    return _with_base(model, load_tokenizer(resolved), "model", base, None, dev, dtype, [])


def _load_run(path: Path, base: str | None, dev: torch.device, dtype: str, stack: ExitStack) -> Loaded:
    from tyr.export import export_model, load_pruned, load_run_model, read_run

    final = read_run(path)
    dense, tokenizer, resolved, adapter, variants = load_run_model(final, device=str(dev))
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tyr-eval-"))) / "model"
    export_model(
        dense,
        variants,
        folder,
        adapter=adapter,
        architecture=final.architecture,
        metrics=final.metrics,
    )
    model = load_pruned(folder, device=dev)
    cfg = final.config
    # What the run's final metrics were measured on (recorded in metrics.json: evaluation settings are not
    # part of a run's identity), else the run's config (runs of an older Tyr).
    recorded = (final.metrics or {}).get("evaluation") or {}
    defaults = {
        "data": recorded.get("data", cfg.data.eval),
        "data_config": recorded.get("config", cfg.data.eval_config),
        "split": recorded.get("split", cfg.data.eval_split),
        "text_field": recorded.get("text_field", cfg.data.text_field),
        "seq_len": recorded.get("seq_len", cfg.data.seq_len),
        "num_sequences": recorded.get("num_sequences", cfg.data.num_eval_sequences),
        "topk": cfg.search.topk,
    }
    if base is not None:
        loaded = _with_base(model, tokenizer, "run", base, final.architecture, dev, dtype, [])
        loaded.defaults = defaults
        return loaded
    return Loaded(model, tokenizer, "run", dense, resolved.source, defaults, [])


def _with_base(model, tokenizer, kind, base, arch, dev, dtype, notes) -> Loaded:
    """Attach the base model: --base (must load) or architecture.json's base_model (skipped with a note)."""
    from tyr.models import load_model, load_tokenizer, resolve_dtype, resolve_model

    name = base or (arch or {}).get("base_model")
    if not name:
        return Loaded(model, tokenizer, kind, None, None, {}, notes)
    model_dtype = next(model.parameters()).dtype
    torch_dtype = model_dtype if dtype == "auto" else resolve_dtype(dtype, dev)
    try:
        resolved = resolve_model(name)
        dense = load_model(resolved, torch_dtype, dev)
    except TyrError as e:
        if base is not None:
            raise
        notes.append(f"base model {name!r} from architecture.json not loaded ({e}); pass --base for KL")
        return Loaded(model, tokenizer, kind, None, None, {}, notes)
    layers = len((arch or {}).get("layers") or [])
    if layers and len(dense.model.layers) > layers:  # the run pruned a truncated model (model.num_layers)
        from tyr.pipeline import _truncate_layers

        _truncate_layers(dense, layers)
        notes.append(f"base truncated to its first {layers} layers, as in the run")
    if tokenizer is None:
        tokenizer = load_tokenizer(resolved)
    m_vocab = int(model.get_output_embeddings().weight.shape[0])
    b_vocab = int(dense.get_output_embeddings().weight.shape[0])
    if m_vocab != b_vocab:
        raise TyrError(f"the base model {name!r} has a vocabulary of {b_vocab}, the model {m_vocab}; no KL")
    return Loaded(model, tokenizer, kind, dense, name, {}, notes)


def _try_tokenizer(path: str, config):
    from transformers import AutoTokenizer

    try:  # with the model's config: AutoTokenizer then never asks about a folder's remote code
        return AutoTokenizer.from_pretrained(path, config=config)
    except (OSError, ValueError):
        return None


def _architecture(path: Path) -> dict | None:
    file = path / "architecture.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ----------------------------------------------------------------------------------------------- lm-eval
def run_tasks(model, tokenizer, tasks: list[str], batch_size: int, num_fewshot=None, limit=None) -> dict:
    """lm-evaluation-harness on the loaded model (HFLM wrapping it); numeric metrics per task."""
    lm_eval = _lm_eval()
    if lm_eval is None:
        raise TyrError(f"--tasks needs lm-evaluation-harness, which is not installed: {LM_EVAL_INSTALL}")
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    kwargs = {}
    if num_fewshot is not None:
        kwargs["num_fewshot"] = num_fewshot
    if limit is not None:
        kwargs["limit"] = limit
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), **kwargs)
    except KeyError as e:
        raise TyrError(f"lm-eval does not know task {e}; see `lm_eval --tasks list`") from None
    results = (out or {}).get("results", {})
    return {
        task: {
            metric: value
            for metric, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for task, metrics in results.items()
    }


# ---------------------------------------------------------------------------------------------------- CLI
def format_result(result: dict) -> str:
    lines = [f"model: {result['model']} ({result['kind']}, {result['params']:,} parameters)"]
    lines.append(f"data: {result['data']}, {result['eval_tokens']} tokens in windows of {result['seq_len']}")
    lines.append(f"perplexity: {result['ppl']:.3f}")
    if result.get("base"):
        b = result["base"]
        lines.append(f"base: {b['model']} ({b['params']:,} parameters), perplexity {b['ppl']:.3f}")
        lines.append(f"KL to base (top-{result['topk']}): {result['kl']:.5f}")
    for task, metrics in (result.get("tasks") or {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        lines.append(f"{task}: {shown}")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    result = evaluate(
        args.target,
        data=args.data,
        data_config=args.data_config,
        split=args.split,
        seq_len=args.seq_len,
        num_sequences=args.num_sequences,
        base=args.base,
        topk=args.topk,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        progress=progress_bars(args.quiet) and not args.json,
    )
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    sys.stdout.flush()
    return 0


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """Register `tyr eval MODEL_OR_RUN [--data D] [--json] [--seq-len N] [--base BASE] [--tasks T,...]`."""
    p = sub.add_parser(
        "eval",
        help="perplexity (and KL to the base model) of a pruned model or a finished run",
        description="Perplexity on held-out text and, when the base model is known, top-K KL divergence to it.",
    )
    p.add_argument("target", metavar="MODEL_OR_RUN", help="run directory, model folder, or model name")
    p.add_argument(
        "--data",
        help=f"held-out text: built-in alias, local file/folder, or hub dataset (default {DEFAULT_DATA})",
    )
    p.add_argument("--data-config", help="hub dataset config name (e.g. wikitext-2-raw-v1)")
    p.add_argument("--split", help="hub dataset split (default test)")
    p.add_argument("--seq-len", type=int, help=f"tokens per window (default {DEFAULT_SEQ_LEN}, or the run's)")
    p.add_argument("--num-sequences", type=int, help="evaluate only the first N windows (default all)")
    p.add_argument("--base", help="base model for KL (default: architecture.json's base_model, or the run's)")
    p.add_argument(
        "--topk", type=int, help=f"teacher logits per token for KL (default {DEFAULT_TOPK}, or the run's)"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument(
        "--tasks",
        help=f"comma-separated lm-evaluation-harness tasks, e.g. arc_easy,hellaswag ({LM_EVAL_INSTALL})",
    )
    p.add_argument("--num-fewshot", type=int, help="few-shot examples for --tasks")
    p.add_argument("--limit", type=float, help="examples per task for --tasks (a count, or a fraction < 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)  # --quiet and the other output options: tyr.cli adds them to every command
    return p
