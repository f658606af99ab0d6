"""The math of every adapter block, written once as functions of tensors.

The PyTorch modules of `hpeft_serve.methods` call these with their own parameters; the shared-backbone
export calls them with weights gathered per row from adapter banks. Weight arguments follow the
nn.Linear convention (out, in) unless a docstring says otherwise, and may carry leading batch dimensions
that broadcast against the input's (per-row adapters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "leakyrelu": F.leaky_relu,
    "identity": lambda x: x,
}


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for W (..., out, in); batched weights broadcast over x's leading dims."""
    if w.dim() == 2:
        return F.linear(x, w, b)
    y = x @ w.transpose(-1, -2)
    return y if b is None else y + b


def lora_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """LoRA (Hu et al. 2021): delta = x A^T B^T, A (r, in), B (out, r); the caller scales it."""
    return linear(linear(x, lora_A), lora_B)


def token_mean(t: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence dim of t (B, S, C) -> (B, 1, C); over real tokens only when a mask is given."""
    if token_mask is None:
        return t.mean(dim=1, keepdim=True)
    return (t * token_mask).sum(dim=1, keepdim=True) / token_mask.sum(dim=1, keepdim=True).clamp_min(1.0)


def gate(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """UniPELT gate (Mao et al. 2022): g = mean_t sigmoid(w x_t + b), one value per example, (B, 1, C).

    With token_mask=None the mean runs over padding too, as the original code and AdapterHub do."""
    return token_mean(torch.sigmoid(linear(x, w, b)), token_mask)


def phm_linear(x: torch.Tensor, rule: torch.Tensor, W_left: torch.Tensor, W_right: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """PHM layer (Zhang et al. 2021; Compacter, Karimi Mahabadi et al. 2021): y = x H + b with
    H = sum_i kron(rule_i, W_left_i @ W_right_i), H (in, out) -- AdapterHub's orientation.

    rule (n, n, n), W_left (n, in/n, r), W_right (n, r, out/n). W and H are never formed: x is contracted
    with the low-rank factors, n*r*(in + n^2 + out) multiply-adds per row instead of in*out.
    Batched weights carry leading dims (B, 1, ...) that broadcast against x (B, S, in).
    """
    n, r = rule.shape[-1], W_left.shape[-1]
    X = x.reshape(*x.shape[:-1], 1, n, x.shape[-1] // n)  # (..., 1, n(j), I)
    U = X @ W_left  # (..., n(i), n(j), r): U[i,j,t] = sum_k X[j,k] W_left[i,k,t]
    V = rule.transpose(-1, -2) @ U  # (..., n(i), n(p), r): V[i,p,t] = sum_j rule[i,j,p] U[i,j,t]
    V = V.transpose(-3, -2).reshape(*V.shape[:-3], n, n * r)  # (..., n(p), n(i)*r)
    Y = V @ W_right.reshape(*W_right.shape[:-3], n * r, W_right.shape[-1])  # (..., n(p), O)
    y = Y.reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def phm_weight(rule: torch.Tensor, W_left: torch.Tensor, W_right: torch.Tensor) -> torch.Tensor:
    """The dense H (in, out) = sum_i kron(rule_i, W_left_i @ W_right_i), for tests and merging."""
    B = W_left @ W_right  # (n, I, O)
    n, I, O = B.shape
    return torch.einsum("ijp,ikq->jkpq", rule, B).reshape(n * I, n * O)
