"""The UNet's text-conditioned transformer blocks (CompVis `ldm/modules/attention.py`, SD v1 variant).

Submodule names equal the checkpoint's (`attn1.to_q`, `ff.net.0.proj`, `proj_in`, ...), so weights load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """The 32-group normalization every SD v1 block uses."""
    return GroupNorm32(32, channels, eps=eps)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the weights' dtype, as the original does for fp16 stability."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16):
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        if x.device.type == "cpu":
            # torch's CPU kernel takes half-precision input with float32 parameters and computes in float32 itself:
            # the upcast result (up to about 1 element in 10^4 one unit apart in the last place), without two copies
            # of every feature map: several times faster, and a bf16 VAE decode no longer lags behind diffusers'.
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of queries from `x` over keys/values from `context` (itself when None)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        batch = x.shape[0]
        # (b, n, heads*d) -> (b, heads, n, d); SDPA's default scale 1/sqrt(d) is the original's `dim_head ** -0.5`.
        q, k, v = (t.view(batch, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[-1])
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU: half of the projection gates the other half."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(x)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x width; `net.1` is the original's (inference-time no-op) dropout slot."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; each pre-normed and residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # `x + ...`, in that order, keeps x's memory layout: SpatialTransformer's feature map (b, c, hw) seen as
        # (b, hw, c), which its reshape turns back into an ordinary map. `... + x` answers a contiguous (b, hw, c),
        # which that reshape turns into a channels-last map, and channels-last then spreads through the convolutions
        # and concatenations after it (1.27x the time of a UNet call on the CPU). Out of place once, so the caller's
        # tensor is left alone; in place after that.
        x = x + self.attn1(self.norm1(x))
        x += self.attn2(self.norm2(x), context)
        return x.add_(self.ff(self.norm3(x)))


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the pixels of a feature map, with 1x1 convolutions in and out (SD v1)."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(inner, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.proj_in(self.norm(x))
        inner = x.shape[1]
        x = x.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = x.transpose(1, 2).reshape(b, inner, h, w)
        return self.proj_out(x).add_(residual)
