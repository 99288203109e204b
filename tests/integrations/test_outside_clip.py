"""keel.watch on open_clip's ``src/open_clip_train/train.py`` ``train_one_epoch`` loop (mlfoundations/open_clip
@035dfeb), accum_freq 1, built by hand at a tiny size: ``scheduler(step)`` (``cosine_lr``: warm-up, then cosine,
assigned to every ``param_group["lr"]``) at the top of each step, ``optimizer.zero_grad()``, the contrastive loss
(``logit_scale * image_features @ text_features.T``, cross-entropy both ways, halved), ``backward`` through a
GradScaler or not, ``clip_grad_norm_``, ``optimizer.step()``, then ``clamp_logit_scale()`` (``clamp_(0, ln 100)``).
AdamW betas (0.9, 0.98), eps 1e-6, weight decay 0.2 except gains, biases and ``logit_scale`` (main.py's two groups).

keel's line after the optimizer and scaler: ``guard = keel.watch(model, optimizer, scaler=scaler, policy=...)``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import keel
from keel.recover import RecoveryConfig
from keel.store import RunReader

STEPS, BATCH, CONCEPTS, PIXELS, TOKENS, VOCAB, EMBED = 12, 8, 8, 3 * 4 * 4, 4, 32, 16


class TinyCLIP(nn.Module):
    """open_clip's CLIP interface: ``encode_image``, ``encode_text``, a learnt ``logit_scale`` at ln(1/0.07), and its
    forward's two forms: a dict (``output_dict=True``, what open_clip's training builds) or, by default, the tuple
    ``image_features, text_features, self.logit_scale.exp()``."""

    def __init__(self, output_dict: bool) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Linear(PIXELS, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, EMBED))
        self.token_embedding = nn.Embedding(VOCAB, 32)
        self.ln_final = nn.LayerNorm(32)
        self.text_projection = nn.Linear(32, EMBED, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.output_dict = output_dict

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(image.flatten(1)), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.ln_final(self.token_embedding(text).mean(1))), dim=-1)

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        image_features, text_features = self.encode_image(image), self.encode_text(text)
        if self.output_dict:
            return {
                "image_features": image_features,
                "text_features": text_features,
                "logit_scale": self.logit_scale.exp(),
            }
        return image_features, text_features, self.logit_scale.exp()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """open_clip's ClipLoss on one device."""
    logits_per_image = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(image_features))
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def cosine_lr(optimizer: torch.optim.Optimizer, base_lr: float, warmup_length: int, steps: int):
    def _lr_adjuster(step: int) -> float:
        if step < warmup_length:
            lr = base_lr * (step + 1) / warmup_length
        else:
            lr = 0.5 * (1 + math.cos(math.pi * (step - warmup_length) / (steps - warmup_length))) * base_lr
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        return lr

    return _lr_adjuster


def _pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images of a concept (its prototype plus noise) and captions of its words, a third of them replaced."""
    g = torch.Generator().manual_seed(1)
    prototypes, words = (
        torch.randn(CONCEPTS, PIXELS, generator=g),
        torch.randint(0, VOCAB, (CONCEPTS, TOKENS), generator=g),
    )
    pairs = []
    for _ in range(STEPS):
        concept = torch.randperm(CONCEPTS, generator=g)[:BATCH]
        images = (prototypes[concept] + 0.8 * torch.randn(BATCH, PIXELS, generator=g)).view(BATCH, 3, 4, 4)
        noise = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)
        texts = torch.where(torch.rand(BATCH, TOKENS, generator=g) < 0.3, noise, words[concept])
        pairs.append((images, texts))
    return pairs


def _train(policy: str | None, *, output_dict=True, amp=False, run_dir=None, nan_image_at=-1, lr_x100_at=-1):
    torch.manual_seed(0)
    model = TinyCLIP(output_dict)
    decay_free = [p for n, p in model.named_parameters() if p.ndim < 2 or "ln" in n or "logit_scale" in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim < 2 or "ln" in n or "logit_scale" in n)]
    groups = [{"params": decay_free, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.2}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    scaler = torch.amp.GradScaler("cpu") if amp else None
    scheduler = cosine_lr(optimizer, 1e-3, 3, STEPS)
    guard = None
    if policy is not None:
        recovery = RecoveryConfig(snapshot_every=2, quiet_steps=0)
        guard = keel.watch(model, optimizer, scaler=scaler, policy=policy, recovery=recovery, run_dir=run_dir)
    logged = []
    try:
        for step, (images, texts) in enumerate(_pairs()):
            scheduler(step)
            if step == lr_x100_at:
                for param_group in optimizer.param_groups:
                    param_group["lr"] *= 100  # a warm-up formula off by 100 for one step
            if step == nan_image_at:
                images = images.clone()
                images[1] = float("nan")  # an image that decoded to NaN
            optimizer.zero_grad()
            out = model(images, texts)
            total_loss = clip_loss(**out) if output_dict else clip_loss(*out)
            if scaler is not None:
                scaler.scale(total_loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, norm_type=2.0)
                scaler.step(optimizer)
                scaler.update()
            else:
                total_loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, norm_type=2.0)
                optimizer.step()
            with torch.no_grad():  # clamp_logit_scale: ln(100), as in the original paper
                model.logit_scale.clamp_(0, math.log(100))
            logged.append(total_loss.item())
    finally:
        if guard is not None:
            guard.close()
    return model, logged, guard


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "grad-scaler"])
def test_observe_is_bit_identical_to_the_bare_loop_and_finds_nothing_in_a_healthy_run(amp: bool):
    bare, bare_logged, _ = _train(None, amp=amp)
    observed, logged, guard = _train("observe", amp=amp)
    assert guard is not None and not guard.decisions
    assert [f for f in guard.findings if f.severity != "info"] == []
    assert logged == bare_logged and _same(bare, observed)


def test_the_loss_keel_judges_is_the_contrastive_loss_not_the_returned_temperature(tmp_path: Path):
    """h28 V: open_clip's CLIP returns ``image_features, text_features, logit_scale.exp()`` by default, and the one
    scalar of a returned tuple was taken for the loss (nanoGPT's ``logits, loss``): keel judged the temperature
    (14.3 rising as CLIP learns: a divergence warning on a healthy run) and never saw the loss."""
    _, logged, _ = _train("observe", output_dict=False, run_dir=tmp_path)
    run = RunReader(tmp_path)
    try:
        stored = run.signal("loss")[1].tolist()
    finally:
        run.close()
    assert stored == pytest.approx(logged, rel=1e-6)


@pytest.mark.parametrize("policy", ["skip", "recover"])
def test_a_nan_image_and_a_step_at_lr_x100_are_skipped_and_the_run_goes_on(policy: str):
    model, logged, guard = _train(policy, nan_image_at=5, lr_x100_at=8)
    assert guard is not None
    assert [(d.step, d.action) for d in guard.decisions] == [(5, "skip"), (8, "skip")]
    assert [f.kind for f in guard.findings if f.severity == "critical"] == ["non_finite", "lr_surge"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(logged[-1]) and logged[-1] < logged[0]  # learning goes on


def test_under_a_grad_scaler_a_nan_image_is_the_scalers_skip():
    """The scaler finds the inf/NaN gradients and skips the step itself: keel records it as the scaler's."""
    model, _, guard = _train("recover", amp=True, nan_image_at=5)
    assert guard is not None and [(d.step, d.action, d.by) for d in guard.decisions] == [(5, "skip", "scaler")]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _outputs(kind: str):
    """Model outputs in training, each with the graph it would have."""
    scale, head = nn.Parameter(torch.tensor(2.0)), nn.Linear(3, 2)
    features = head(torch.randn(4, 3))
    loss = F.cross_entropy(features, torch.tensor([0, 1, 0, 1]))
    return {
        "open_clip": ((features, features, scale.exp()), None),  # the temperature is no loss
        "a bare parameter": ((features, scale), None),
        "a clamped temperature": ((features, scale.exp().clamp(max=100)), None),
        "nanoGPT": ((features, loss), loss),  # logits, loss
        "a loss and a temperature": ((features, loss, scale.exp()), loss),  # the loss is the one left
        "a scaled parameter": ((features, scale * 2.0), "kept"),  # a constant entered: taken as before
    }[kind]


@pytest.mark.parametrize(
    "kind",
    [
        "open_clip",
        "a bare parameter",
        "a clamped temperature",
        "nanoGPT",
        "a loss and a temperature",
        "a scaled parameter",
    ],
)
def test_output_loss_leaves_out_scalars_made_from_the_parameters_alone(kind: str):
    from keel.integrations.watch import output_loss

    output, expected = _outputs(kind)
    found = output_loss(output)
    if expected is None:
        assert found is None
    elif expected == "kept":
        assert found is output[1]
    else:
        assert found is expected
