"""A byte-level U-ViT for `keel bench detect --probe-costs`'s ``scale_long`` rows: keel's proxy has no long skips.

U-ViT's layout (Bao et al. 2023), the one ``scale_long`` matches structurally: ``in_blocks``, a ``mid_block``, and
``out_blocks`` whose blocks take a ``skip`` argument and fuse it with ``skip_linear`` (2D → D) over ``[x, skip]``;
block i of the decoder receives the skip of encoder block N−1−i. Tokens are bytes embedded to ``dim`` with a
learned position, and a head predicts the next byte, so the benchmark's language-model loop trains it as it is.
The blocks are pre-norm MLPs (no attention: the rows time the skip scaling against the same network without it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class UBlock(nn.Module):
    """A pre-norm MLP block; with ``skip`` it first fuses the long skip: ``skip_linear([x, skip])``."""

    def __init__(self, dim: int, skip: bool) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.skip_linear is not None and skip is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        return x + self.mlp(x)


class ByteUViT(nn.Module):
    """``depth`` encoder blocks, a middle block and ``depth`` decoder blocks with long skips, over bytes."""

    def __init__(self, dim: int = 128, depth: int = 3, seq_len: int = 64) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(256, dim)
        self.pos_emb = nn.Parameter(torch.zeros(seq_len, dim))
        self.in_blocks = nn.ModuleList(UBlock(dim, skip=False) for _ in range(depth))
        self.mid_block = UBlock(dim, skip=False)
        self.out_blocks = nn.ModuleList(UBlock(dim, skip=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx) + self.pos_emb[: idx.shape[1]]
        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            x = block(x, skips.pop())
        return self.head(self.norm(x))
