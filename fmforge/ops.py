"""The output layer and its cross-entropy in one pass over row chunks, without the (N, vocab) logits.

`F.cross_entropy(F.linear(x, weight).float(), targets)` materialises the logits (N x V; 2,048 x 8,192 for a batch of
the `base` preset), an fp32 copy of them, their log-softmax, the log-softmax's gradient and a zero-filled gradient
buffer: each a pass over 64 MB that leaves the caches. On a CPU those passes cost about as much as the output
layer's matrix products: for the `base` preset's head in bf16 (2,048 x 384 -> 8,192, 2 threads) forward + backward
took 200-260 ms unfused and takes 130-140 ms here. Here each chunk of rows computes its logits, its loss and, when
a gradient is wanted, the gradient of its logits (softmax - one-hot) while they are still in cache, turns that into
the gradients of the chunk's inputs and of the weight, and drops the logits: the backward pass only scales what the
forward stored.
Liger-Kernel's fused linear cross-entropy does the same on GPUs (Hsu et al., 2024).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 21  # logits per chunk: 8 MiB of fp32, about what the last-level cache of one core pair holds


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of x @ weight.T against targets, computed in `dtype` (the matrix products) and fp32
    (the softmax), chunk by chunk. Returns a 0-dim fp32 tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
                chunk_rows: int) -> torch.Tensor:
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        xd, w = x.to(dtype), weight.to(dtype)
        grad_x = torch.empty_like(xd) if want_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            xs, ts = xd[rows], targets[rows]
            logits = torch.mm(xs, w.t()).float()  # (n, V)
            valid = ts != IGNORE_INDEX
            picked = torch.where(valid, ts, 0).unsqueeze(1)
            logp = torch.log_softmax(logits, dim=-1)
            total -= logp.gather(1, picked).squeeze(1).masked_fill_(~valid, 0.0).sum()
            if not (want_x or want_w):
                continue
            grad = logp.exp_()  # softmax, in place of the log-probabilities
            grad.scatter_add_(1, picked, -valid.to(grad.dtype).unsqueeze(1))
            grad.mul_(valid.unsqueeze(1))  # ignored rows contribute nothing
            grad = grad.to(dtype)
            if want_x:
                torch.mm(grad, w, out=grad_x[rows])
            if want_w:
                grad_w += torch.mm(grad.t(), xs)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_output.float()
        dx = None if grad_x is None else (grad_x * scale).to(ctx.x_dtype)
        dw = None if grad_w is None else (grad_w * scale).to(ctx.w_dtype)
        return dx, dw, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=-100, reduction=reduction), fused.

    x: (..., C) hidden states; weight: (V, C); targets: x's leading shape, -100 = ignored. The matrix products run
    in the autocast dtype where autocast is on for x's device (as F.linear would), else in x's dtype; each chunk
    holds about `chunk_elements` logits.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x2, t = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    chunk_rows = max(1, chunk_elements // weight.shape[0])
    with torch.autocast(device, enabled=False):
        total = LinearCrossEntropy.apply(x2, weight, t, dtype, chunk_rows)
    if reduction == "sum":
        return total
    return total / (t != IGNORE_INDEX).sum()  # 0 / 0 = nan when every target is ignored, as F.cross_entropy
