"""Fitness: sparse top-K KL(dense teacher || candidate), computed without the full vocabulary projection.

The candidate only needs its logits at the teacher's top-K token ids.  We run the base transformer
(`model.model`, whose output already has the final norm applied), take U = the union of the batch's
teacher ids, project onto `lm_head.weight[U]` only (+ bias[U]), and gather each position's K logits
through the inverse map id -> column of U (see `logits_at_indices`, which also falls back to the full
projection when U covers most of the vocabulary and to per-position dot products when K is tiny).
Both distributions are renormalised over the K entries (log-softmax over K), which makes the
estimate exact when K equals the vocabulary size.

Reduction: every forward of `batch_size` consecutive sequences gives one float32 KL sum per sequence on the
device (`sparse_kl_sums`, float64 on the host); the mean is their float64 sum in sequence order over the number
of positions (`kl_mean`). A sequence's sum depends only on the forward it was in, so any split of the blocks of
sequences over processes reduces to the same value.

Devices: input ids go to the input embedding's device (`model_device`); everything combined with the model's
output follows the hidden states it meets. A model spread over several GPUs ends on the last one while its
embedding sits on the first, and a tied output head stays with the embedding: the final hidden states go to the
head's weight (`head_input`), and teacher targets and labels go where the hidden states then are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tyr.errors import TyrError

# Upper bound on the elements of one (positions x |U|) logit block; larger batches are split by position.
DEFAULT_LOGIT_BUDGET = 1 << 27
# When the union covers more than this fraction of the vocabulary, the full projection is cheaper.
_FULL_PROJECTION_FRACTION = 0.5
# Gathering K weight rows per position costs about as much as projecting onto ~200-250 columns of U
# (measured on CPU; the flop/byte ratio of current GPUs is similar), so past this ratio go direct.
_DIRECT_GATHER_RATIO = 256


# --------------------------------------------------------------------------------------------- helpers
def model_device(model) -> torch.device:
    """Where input ids go: the input embedding's device (the first GPU of a model spread over several; the
    compute device of a model whose blocks are kept in host RAM)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is not None and hasattr(embedding, "weight"):
        return embedding.weight.device
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


def head_input(h: torch.Tensor, head) -> torch.Tensor:
    """The final hidden states on the output head's device (a no-op unless the model is spread over devices)."""
    return h.to(head.weight.device)


def base_and_head(model):
    """(base transformer returning last_hidden_state, output projection) of a HF causal LM."""
    base = getattr(model, "model", None)
    if base is None and hasattr(model, "get_decoder"):
        base = model.get_decoder()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "lm_head", None)
    if base is None or head is None or not hasattr(head, "weight"):
        raise TyrError(
            f"{type(model).__name__} is not a supported causal LM: expected a `.model` base transformer "
            "and an `lm_head` output projection (Llama/Mistral/Qwen2/Qwen3 families)"
        )
    return base, head


def hidden_states(base, input_ids: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states (B, T, D) of the base transformer."""
    out = base(input_ids=input_ids, use_cache=False)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h


def check_tokens(tokens: torch.Tensor, vocab_size: int | None = None, min_len: int = 1) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise TyrError(
            f"tokens must be a 2-D (num_sequences, seq_len) tensor, got {getattr(tokens, 'shape', tokens)!r}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise TyrError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    if tokens.shape[0] < 1:
        raise TyrError("need at least one token sequence, got none")
    if tokens.shape[1] < min_len:
        raise TyrError(f"sequences must have at least {min_len} tokens, got seq_len={tokens.shape[1]}")
    if tokens.numel() and vocab_size is not None:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise TyrError(
                f"token ids must lie in [0, {vocab_size}) for this model, found range [{lo}, {hi}]; "
                "was the calibration data tokenised with a different tokenizer?"
            )
    return tokens.long()


def _vocab_size(head) -> int:
    return int(head.weight.shape[0])


def iter_batches(n: int, batch_size: int, progress: bool, desc: str):
    if batch_size < 1:
        raise TyrError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", total=(n + batch_size - 1) // batch_size)
    for s in starts:
        yield s, min(s + batch_size, n)


# ---------------------------------------------------------------------------------------------- KL core
def sparse_kl_from_logits(student_logits_at_idx: torch.Tensor, teacher_values: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher || student) over K entries, both log-softmax-renormalised over K; float32.

    Shapes (..., K) -> (...).
    """
    if student_logits_at_idx.shape != teacher_values.shape:
        raise ValueError(
            f"shape mismatch: student {student_logits_at_idx.shape} vs teacher {teacher_values.shape}"
        )
    lt = F.log_softmax(teacher_values.float(), dim=-1)
    ls = F.log_softmax(student_logits_at_idx.float(), dim=-1)
    pt = lt.exp()
    terms = torch.where(pt > 0, pt * (lt - ls), torch.zeros((), dtype=pt.dtype, device=pt.device))
    return terms.sum(dim=-1)


def logits_at_indices(
    h: torch.Tensor,
    head,
    indices: torch.Tensor,
    logit_budget: int = DEFAULT_LOGIT_BUDGET,
    method: str = "auto",
) -> torch.Tensor:
    """Logits of `head` applied to h (n, D) at `indices` (n, K), without projecting onto the full vocabulary.

    method "union": U = the token ids present in `indices` (a presence mask over the vocabulary, cheaper
    than sorting n*K ids), projected as h @ W[U].T (+ bias[U]); each position's K logits are gathered
    through the inverse map id -> column of U.  "full": the plain full projection, then a gather (used
    when U covers most of the vocabulary).  "direct": per-position dot products with the K gathered
    weight rows (used when K is tiny next to |U|).  "auto" picks by cost.  Positions are processed in
    chunks so that one (chunk x columns) block stays within `logit_budget` elements.  Returns (n, K) float32.
    """
    if method not in ("auto", "union", "full", "direct"):
        raise ValueError(f"unknown method {method!r}")
    n, k = indices.shape
    vocab = _vocab_size(head)
    weight = head.weight
    h, indices = h.to(weight.device), indices.to(weight.device)  # no-ops unless the caller's are elsewhere
    bias = getattr(head, "bias", None)
    out = torch.empty((n, k), dtype=torch.float32, device=h.device)
    num_u = vocab
    if method in ("auto", "union"):
        present = torch.zeros(vocab, dtype=torch.bool, device=indices.device)
        present[indices.reshape(-1)] = True
        num_u = int(present.sum())
    if method == "auto":
        if num_u > _FULL_PROJECTION_FRACTION * vocab:
            method = "full"
        elif num_u > _DIRECT_GATHER_RATIO * k:
            method = "direct"
        else:
            method = "union"
    if method == "direct":
        chunk = max(1, logit_budget // max(k * h.shape[-1], 1))
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            idx = indices[s:e]
            logits = torch.bmm(weight[idx], h[s:e].unsqueeze(-1)).squeeze(-1)  # (c, K)
            if bias is not None:
                logits = logits + bias[idx]
            out[s:e] = logits.float()
        return out
    if method == "full":
        cols, w, b, gather_idx = vocab, weight, bias, indices
    else:
        uniq = present.nonzero().squeeze(1)
        gather_idx = (torch.cumsum(present, 0) - 1)[indices]  # id -> column in U
        cols, w = num_u, weight.index_select(0, uniq)
        b = bias.index_select(0, uniq) if bias is not None else None
    chunk = max(1, logit_budget // max(cols, 1))
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        logits = F.linear(h[s:e], w, b)
        out[s:e] = logits.gather(1, gather_idx[s:e]).float()
    return out


def _kl_sequence_sums(base, head, ids, t_values, t_indices, logit_budget, method="auto") -> torch.Tensor:
    """Per-sequence sums of the per-token sparse KL over one forward of ids (b, t): (b,) CPU float64.

    The KL and each sequence's sum over its positions are float32 on the device (as every forward computes
    them); only the b sums are converted, so a sequence's value depends only on the forward it was part of.
    """
    _check_index_range(t_indices, _vocab_size(head))
    h = head_input(hidden_states(base, ids), head)
    # the targets follow the hidden states (not the embedding's device: a model spread over several GPUs
    # ends elsewhere); no-ops when they are there already
    t_values = t_values.to(h.device, non_blocking=True)
    t_indices = t_indices.to(h.device, non_blocking=True)
    b, t, d = h.shape
    k = t_indices.shape[-1]
    idx = t_indices.reshape(b * t, k).long()
    student = logits_at_indices(h.reshape(b * t, d), head, idx, logit_budget, method)
    kl = sparse_kl_from_logits(student, t_values.reshape(b * t, k))  # (b * t,) float32
    return kl.reshape(b, t).sum(dim=1).cpu().double()


def kl_mean(sequence_sums, num_positions: int) -> float:
    """Mean per-token KL from per-sequence KL sums (each over `num_positions` positions).

    The sums are added in float64 one after another in the order given (sequence order), so the result depends
    only on the values and their order, never on where or in which order they were computed: whoever reduces the
    same sums gets the same bits (the search's serial and distributed backends rely on this).
    """
    values = [float(v) for v in sequence_sums]
    if not values or num_positions < 1:
        raise TyrError(
            f"kl_mean needs at least one sequence and position, got {len(values)} x {num_positions}"
        )
    total = 0.0
    for v in values:
        total += v
    return total / (len(values) * num_positions)


def _check_targets(tokens, values, indices, vocab):
    n, t = tokens.shape
    if values.dim() != 3 or values.shape[:2] != (n, t) or values.shape != indices.shape:
        raise TyrError(
            f"teacher targets do not match the tokens: tokens {tuple(tokens.shape)}, "
            f"values {tuple(values.shape)}, indices {tuple(indices.shape)}"
        )


def _check_index_range(indices: torch.Tensor, vocab: int) -> None:
    # Per batch, on the device: an out-of-range id would otherwise be a CUDA device-side assert.
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= vocab:
            raise TyrError(
                f"teacher indices lie in [{lo}, {hi}], outside this model's vocabulary [0, {vocab}); "
                "were the teacher targets computed with a different tokenizer?"
            )


def sparse_kl_sums(
    model,
    tokens: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
    logit_budget: int = DEFAULT_LOGIT_BUDGET,
    method: str = "auto",
) -> torch.Tensor:
    """Per-sequence sums over positions of the sparse top-K KL(teacher || model): (N,) float64.

    tokens (N, T) int; teacher_values (N, T, K) raw teacher logits (any float dtype); teacher_indices
    (N, T, K) token ids. Forwards take `batch_size` consecutive sequences ([0:bs], [bs:2bs], ...): a sequence's
    value can depend on the forward it shares (batched kernels), so callers that must agree bit for bit use the
    same blocks. Targets may live on the CPU; each batch is moved to where the model's output is.
    """
    base, head = base_and_head(model)
    vocab = _vocab_size(head)
    tokens = check_tokens(tokens, vocab)
    _check_targets(tokens, teacher_values, teacher_indices, vocab)
    device = model_device(model)
    sums = []
    with torch.inference_mode():
        for s, e in iter_batches(tokens.shape[0], batch_size, progress, "sparse KL"):
            ids = tokens[s:e].to(device)
            tv, ti = teacher_values[s:e], teacher_indices[s:e]
            sums.append(_kl_sequence_sums(base, head, ids, tv, ti, logit_budget, method))
    return torch.cat(sums)


def sparse_kl(
    model,
    tokens: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
    logit_budget: int = DEFAULT_LOGIT_BUDGET,
    method: str = "auto",
) -> float:
    """Mean per-token sparse top-K KL(teacher || model) over all N*T positions (`sparse_kl_sums`, `kl_mean`).

    `method` chooses how the candidate's logits at the K ids are computed (see `logits_at_indices`).
    """
    sums = sparse_kl_sums(
        model, tokens, teacher_values, teacher_indices, batch_size, progress, logit_budget, method
    )
    return kl_mean(sums.tolist(), tokens.shape[1])


def place_targets(
    values: torch.Tensor, indices: torch.Tensor, device: torch.device, max_device_fraction: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a fitness call keeps the teacher rows all its candidates share (read once per call).

    On a GPU: on the device when they take at most `max_device_fraction` of its free memory (moved once, not
    once per candidate), else in pinned host memory (fast, asynchronous copies per batch). Elsewhere unchanged.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return values, indices
    nbytes = values.numel() * values.element_size() + indices.numel() * indices.element_size()
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes <= max_device_fraction * free:
        return values.to(device), indices.to(device)
    return values.pin_memory(), indices.pin_memory()


def sparse_kl_targets(
    model,
    tokens: torch.Tensor,
    targets,
    sequence_indices=None,
    batch_size: int = 4,
    progress: bool = False,
    logit_budget: int = DEFAULT_LOGIT_BUDGET,
    method: str = "auto",
    num_positions: int | None = None,
) -> float:
    """Like `sparse_kl`, reading the teacher targets batch by batch from a stored `TeacherTargets`.

    `tokens` is the full calibration set the targets were computed on; `sequence_indices` selects the
    rows to evaluate (default: all); `num_positions` scores only the first P positions of each row (a prefix
    is a valid input under causal attention; the mean is over the prefixes' positions). Only the selected
    rows' targets are read from disk.
    """
    base, head = base_and_head(model)
    vocab = _vocab_size(head)
    tokens = check_tokens(tokens, vocab)
    if tokens.shape != (targets.num_sequences, targets.seq_len):
        raise TyrError(
            f"tokens {tuple(tokens.shape)} do not match the stored teacher targets "
            f"({targets.num_sequences}, {targets.seq_len})"
        )
    rows = (
        list(range(targets.num_sequences)) if sequence_indices is None else [int(i) for i in sequence_indices]
    )
    if not rows:
        raise TyrError("sparse_kl_targets needs at least one sequence")
    positions = targets.seq_len if num_positions is None else int(num_positions)
    if not 1 <= positions <= targets.seq_len:
        raise TyrError(f"num_positions must be in [1, {targets.seq_len}], got {num_positions}")
    device = model_device(model)
    sums = []
    with torch.inference_mode():
        for s, e in iter_batches(len(rows), batch_size, progress, "sparse KL"):
            sel = rows[s:e]
            tv, ti = targets.get(sel, num_positions)
            ids = tokens[sel, :positions].to(device)
            sums.extend(_kl_sequence_sums(base, head, ids, tv, ti, logit_budget, method).tolist())
    return kl_mean(sums, positions)


def full_kl(model, tokens: torch.Tensor, teacher_logits_full: torch.Tensor, batch_size: int = 4) -> float:
    """Reference: mean per-token KL(softmax(teacher) || softmax(model)) over the full vocabulary."""
    tokens = check_tokens(tokens)
    device = model_device(model)
    n, t = tokens.shape
    if teacher_logits_full.shape[:2] != (n, t):
        raise TyrError(f"teacher logits {tuple(teacher_logits_full.shape)} do not match tokens {(n, t)}")
    total = torch.zeros((), dtype=torch.float64)
    with torch.inference_mode():
        for s, e in iter_batches(n, batch_size, False, ""):
            logits = model(input_ids=tokens[s:e].to(device), use_cache=False).logits
            kl = sparse_kl_from_logits(logits, teacher_logits_full[s:e].to(logits.device))
            total += kl.sum().cpu().double()
    return float(total / (n * t))
