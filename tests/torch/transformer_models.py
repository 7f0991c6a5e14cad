"""A tiny pre-LN transformer built in code for the AWQ, SmoothQuant and block-by-block tests: a stack of blocks in
an ``nn.ModuleList`` (q, k, v reading one LayerNorm; attention; an MLP), with outlier channels after the
LayerNorms (a few large gains, as trained LLMs have)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def split(y):
            return y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """``x (batch, tokens, features) -> (batch, tokens, out)``: an input projection, ``n_blocks`` blocks with a
    causal mask passed to each as a keyword, a final LayerNorm and a head."""

    def __init__(self, d: int = 32, n_blocks: int = 2, d_in: int = 8, out: int = 8, seed: int = 0, outliers=True):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, out)
        if outliers:
            g = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, nn.LayerNorm):
                        m.weight.uniform_(0.5, 1.5, generator=g)
                        m.bias.uniform_(-0.2, 0.2, generator=g)
                        m.weight[torch.randperm(d, generator=g)[:2]] *= 25.0  # outlier channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, mask=mask)
        return self.head(self.ln_f(h))


def tokens(n: int = 4, batch: int = 4, t: int = 16, d_in: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, t, d_in, generator=g) for _ in range(n)]
