"""OWL's layer outlier ratios (Yin et al., 2024): the share of |W|·‖X‖ scores far above their layer's mean.

For every linear layer of a decoder block the Wanda score ``|W_ij| * ||X_j||`` is formed with ``||X_j||`` the
input feature norms over the calibration tokens of the *dense* model; a block's outlier ratio is the fraction
of all its scores above ``threshold`` times their mean. Blocks with more outliers are pruned less.
"""

from __future__ import annotations

import torch
from torch import nn

_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@torch.inference_mode()
def layer_outlier_ratios(
    model: nn.Module, layers: list[nn.Module], tokens: torch.Tensor, threshold: float, batch_size: int = 8
) -> list[float]:
    """One outlier ratio in [0, 1] per decoder block in ``layers``, from a dense forward over ``tokens``."""
    linears = [[layer.get_submodule(name) for name in _LINEARS] for layer in layers]
    squares = {
        id(lin): torch.zeros(lin.in_features, dtype=torch.float64) for block in linears for lin in block
    }

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        squares[id(module)] += x.double().square().sum(0).cpu()

    handles = [lin.register_forward_pre_hook(hook) for block in linears for lin in block]
    device = next(model.parameters()).device
    try:
        for i in range(0, tokens.shape[0], batch_size):
            model(tokens[i : i + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [_outlier_ratio(block, squares, threshold) for block in linears]


def _outlier_ratio(block: list[nn.Linear], squares: dict[int, torch.Tensor], threshold: float) -> float:
    """Two passes over the block's linears (mean, then count) instead of one huge concatenated score tensor."""

    def scores(lin: nn.Linear) -> torch.Tensor:
        norms = squares[id(lin)].sqrt().to(device=lin.weight.device, dtype=torch.float32)
        return lin.weight.detach().float().abs() * norms

    total = sum(float(scores(lin).sum(dtype=torch.float64)) for lin in block)
    count = sum(lin.weight.numel() for lin in block)
    cut = threshold * total / count
    return sum(int((scores(lin) > cut).sum()) for lin in block) / count
