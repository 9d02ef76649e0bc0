"""Perplexity: exp(mean next-token NLL) over all N*(T-1) predictions of a token set."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tyr.evaluators.kl import (
    DEFAULT_LOGIT_BUDGET,
    base_and_head,
    check_tokens,
    head_input,
    hidden_states,
    iter_batches,
    model_device,
)


def nll_sum_and_count(
    model,
    tokens: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
    logit_budget: int = DEFAULT_LOGIT_BUDGET,
) -> tuple[float, int]:
    """(sum of next-token NLL in nats, number of predictions) over tokens (N, T).

    Runs the base transformer per batch and projects onto the vocabulary in position chunks of at most
    `logit_budget` elements, so a long batch never materialises the whole (B, T, V) logit tensor.
    Per-chunk sums are float32 on the device, the running total float64 on the CPU.
    """
    base, head = base_and_head(model)
    vocab = int(head.weight.shape[0])
    tokens = check_tokens(tokens, vocab, min_len=2)
    n, t = tokens.shape
    device = model_device(model)
    chunk = max(1, logit_budget // vocab)
    total = torch.zeros((), dtype=torch.float64)
    with torch.inference_mode():
        for s, e in iter_batches(n, batch_size, progress, "perplexity"):
            ids = tokens[s:e].to(device)  # (B, T) on the embedding's device
            h = head_input(hidden_states(base, ids)[:, :-1], head)  # (B, T-1, D) on the head's device
            d = h.shape[-1]
            h = h.reshape(-1, d)
            targets = ids[:, 1:].reshape(-1).to(h.device)  # the labels follow the hidden states
            for a in range(0, h.shape[0], chunk):
                b = min(a + chunk, h.shape[0])
                logits = head(h[a:b]).float()
                total += F.cross_entropy(logits, targets[a:b], reduction="sum").cpu().double()
    return float(total), n * (t - 1)


def perplexity(model, tokens: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token NLL over all N*(T-1) predictions)."""
    nll, count = nll_sum_and_count(model, tokens, batch_size=batch_size, progress=progress)
    return math.exp(nll / count) if count else float("nan")
