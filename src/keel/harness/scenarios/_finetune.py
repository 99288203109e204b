"""Multi-epoch fine-tuning on a small fixed dataset: what the healthy fine-tune scenarios share.

A fine-tune passes over the same few examples several times, and a model that has seen an example predicts
it better the next time: the loss falls in steps at epoch boundaries and ends low, while with a batch of one or
two heterogeneous examples (short and long, easy and hard) the per-step loss swings by tens of per cent
around its level. That is the noise profile of a healthy small-batch LoRA or full fine-tune, and the one a
detector tuned on pre-training curves mistakes for divergence.

The pieces: a base model (keel's tiny proxy pre-trained on the corpus, no Guard, cached per process and
seed), a fixed set of heterogeneous snippets from the corpus's held-out split (text the base never saw),
an epoch loop that reshuffles them every epoch, and LoRA adapters (Hu et al. 2021, arXiv 2106.09685) on a
frozen base whose weights are rounded to 4 bits as QLoRA stores them (Dettmers et al. 2023,
arXiv 2305.14314). The adapters are written out here so no `peft` install is needed.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch
from torch import Tensor, nn

from keel.proxy.corpus import ProxyBatches
from keel.proxy.trainer import Batch, TrainConfig, train_proxy

SEQ_LEN = 64
BASE_SIZE = "tiny"
# Pre-training steps of the base. A base that has learnt more memorises faster: from 600 steps the
# 16-example full fine-tune ends near 0.25, from 1200 near 0.1 (measured while building these scenarios).
BASE_STEPS = 1200
# The base sees its own stream of corpus batches, not the fine-tune's seed's (an offset prime).
BASE_DATA_SEED_OFFSET = 104729
IGNORE = -100  # cross-entropy's ignore_index: padding after a short example adds nothing to the loss


@functools.lru_cache(maxsize=2)
def pretrained_base(seed: int) -> dict[str, Tensor]:
    """The tiny proxy after ``BASE_STEPS`` steps of plain AdamW on the corpus: the model every fine-tune starts from.

    Cached, so the scenarios of one process pre-train once; the global RNG is left as it was, so a cached and
    a fresh call give a fine-tune the same random state.
    """
    with torch.random.fork_rng():
        corpus = ProxyBatches(batch_size=8, seq_len=SEQ_LEN, seed=seed + BASE_DATA_SEED_OFFSET)
        # plain AdamW at 3e-3, a 20-step warm-up and then a constant LR (min_lr_ratio 1), no Guard
        config = TrainConfig(
            size=BASE_SIZE,
            seq_len=SEQ_LEN,
            steps=BASE_STEPS,
            batch_size=8,
            lr=3e-3,
            warmup=20,
            min_lr_ratio=1.0,
            batch_fn=lambda step, batch: corpus.next(),
            eval_batches=1,
            seed=seed,
        )
        model = train_proxy(config).model
        assert model is not None
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def snippets(seed: int, n: int, *, short: int = SEQ_LEN // 4) -> Batch:
    """``n`` heterogeneous examples from the held-out split: half easy, half hard, alternately long and short.

    Difficulty is judged by how well zlib compresses a window (repetitive boilerplate compresses well, dense
    code does not): easy ones come from the 12.5–25 % most compressible of 4096 candidate windows, hard ones
    from the 50–62.5 % band (the least compressible are near-random bytes that no small model memorises).
    Long examples fill ``SEQ_LEN`` bytes, short ones ``short``; their padding targets are ignored.

    Returns:
        Inputs and targets, each ``(n, SEQ_LEN)``.
    """
    data = ProxyBatches(batch_size=1, seq_len=SEQ_LEN, split="val").data
    g = torch.Generator().manual_seed(seed + 7)
    starts = torch.randint(len(data) - SEQ_LEN - 1, (4096,), generator=g).tolist()
    ratio = {s: len(zlib.compress(bytes(data[s : s + SEQ_LEN + 1].tolist()), 9)) for s in starts}
    ranked = sorted(starts, key=lambda s: (ratio[s], s))
    band = len(ranked) // 8
    half = n - n // 2
    pick = lambda lo: ranked[lo : lo + band : max(1, band // half)][:half]  # noqa: E731  (spread over the band)
    chosen = [s for pair in zip(pick(band), pick(4 * band), strict=True) for s in pair][:n]
    x = torch.zeros(n, SEQ_LEN, dtype=torch.long)
    y = torch.full((n, SEQ_LEN), IGNORE, dtype=torch.long)
    for i, start in enumerate(chosen):
        length = SEQ_LEN if (i // 2) % 2 == 0 else short  # easy and hard alike, long and short
        window = data[start : start + length + 1]
        x[i, :length], y[i, :length] = window[:-1], window[1:]
    return x, y


class Epochs:
    """Batches of a fixed dataset, reshuffled each epoch: a ``batch_fn(step, batch)`` for `TrainConfig`.

    Example:
        >>> epochs = Epochs(*snippets(0, 4), batch_size=2, seed=0)
        >>> epochs.steps_per_epoch, epochs(3, None)[0].shape
        (2, torch.Size([2, 64]))
    """

    def __init__(self, x: Tensor, y: Tensor, *, batch_size: int, seed: int) -> None:
        if len(x) % batch_size:
            raise ValueError(f"batch_size={batch_size} does not divide the {len(x)} examples; allowed: a divisor")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.steps_per_epoch = len(x) // batch_size
        self._seed = seed
        self._orders: dict[int, list[int]] = {}

    def __call__(self, step: int, batch: Batch | None) -> Batch:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self._seed * 1000 + epoch)
            self._orders[epoch] = torch.randperm(len(self.x), generator=g).tolist()
        idx = self._orders[epoch][i * self.batch_size : (i + 1) * self.batch_size]
        return self.x[idx], self.y[idx]


def round_to_bits(weight: Tensor, bits: int = 4, block: int = 64) -> Tensor:
    """``weight`` rounded to ``bits``-bit integers with one absmax scale per ``block`` values, dequantised.

    QLoRA stores NF4 codes with double-quantised scales; a uniform absmax grid is a simpler stand-in with the
    same effect here: the frozen base the adapters correct is not the base that was trained.
    """
    flat = weight.detach().reshape(-1, block)  # (blocks, block)
    top = 2 ** (bits - 1) - 1
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / top
    return ((flat / scale).round().clamp(-top - 1, top) * scale).reshape_as(weight)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) · B A x``: a frozen linear layer with a trainable low-rank update.

    ``A`` starts random and ``B`` at zero, so training starts from the base model exactly (Hu et al. 2021).
    """

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        base.requires_grad_(False)
        self.base = base
        a = torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features)
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scaling


def apply_lora(model: nn.Module, *, rank: int, alpha: float, bits: int | None, seed: int) -> nn.Module:
    """Freeze ``model``, optionally round its block weights to ``bits`` bits, and put adapters on every block linear."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed + 31)
    for block in model.blocks:  # type: ignore[union-attr]
        for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc"), (block.mlp, "proj")):
            linear = getattr(parent, name)
            if bits is not None:
                with torch.no_grad():
                    linear.weight.copy_(round_to_bits(linear.weight, bits))
            setattr(parent, name, LoRALinear(linear, rank=rank, alpha=alpha, generator=generator))
    return model
