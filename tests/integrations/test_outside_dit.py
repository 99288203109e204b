"""keel.watch on facebookresearch/DiT's ``train.py`` loop, built by hand at a tiny size: ``ema = deepcopy(model)`` and
``requires_grad(ema, False)`` before the optimizer, ``AdamW(lr=1e-4, weight_decay=0)`` (here 1e-3: few steps), then
per batch ``loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()``, ``opt.zero_grad()``,
``loss.backward()``, ``opt.step()``, ``update_ema(ema, model)`` (an in-place ``mul_(decay).add_(param)`` over
``named_parameters``). The model is DiT's shape: patchified latents, adaLN-Zero blocks whose modulation and final
layer start at zero, the class-label dropout of classifier-free guidance; sampling under ``model.eval()`` and
``torch.no_grad()`` in the middle of training.

keel's line after the optimizer: ``guard = keel.watch(model, opt, policy=...)``, and
``guard.track(ema, name="ema")`` so that a rollback restores DiT's EMA with the model."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from copy import deepcopy

import pytest
import torch
from torch import nn

import keel
from keel import KeelWarning
from keel.recover import RecoveryConfig

STEPS, BATCH, CHANNELS, SIZE, PATCH, WIDTH, CLASSES, T = 8, 4, 4, 4, 2, 16, 4, 1000


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(WIDTH, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(approximate="tanh"), nn.Linear(4 * WIDTH, WIDTH))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(WIDTH, 6 * WIDTH))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa.unsqueeze(1) * self.attn(h, h, h, need_weights=False)[0]
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class TinyDiT(nn.Module):
    """Patch embedding, timestep and label embeddings summed into the conditioning, adaLN-Zero blocks, final layer."""

    def __init__(self) -> None:
        super().__init__()
        self.x_embedder = nn.Conv2d(CHANNELS, WIDTH, PATCH, stride=PATCH)
        self.pos_embed = nn.Parameter(torch.randn(1, (SIZE // PATCH) ** 2, WIDTH) * 0.02, requires_grad=False)
        self.t_embedder = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        self.y_embedder = nn.Embedding(CLASSES + 1, WIDTH)  # the last class: classifier-free guidance's null label
        self.blocks = nn.ModuleList([DiTBlock(), DiTBlock()])
        self.final_norm = nn.LayerNorm(WIDTH, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(WIDTH, 2 * WIDTH))
        self.final_linear = nn.Linear(WIDTH, PATCH * PATCH * CHANNELS)
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks] + [self.final_modulation[-1], self.final_linear]
        for layer in zeroed:  # DiT's initialize_weights: adaLN-Zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.training:  # LabelEmbedder.token_drop, dropout 0.1
            y = torch.where(torch.rand(y.shape) < 0.1, torch.full_like(y, CLASSES), y)
        half = WIDTH // 2
        angles = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)
        c = self.t_embedder(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)) + self.y_embedder(y)
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        h = self.final_linear(modulate(self.final_norm(h), shift, scale))
        grid = SIZE // PATCH  # unpatchify
        h = h.view(-1, grid, grid, PATCH, PATCH, CHANNELS).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(-1, CHANNELS, SIZE, SIZE)


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """DiT's, as written."""
    ema_params = OrderedDict(ema_model.named_parameters())
    for name, param in OrderedDict(model.named_parameters()).items():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def requires_grad(model: nn.Module, flag: bool = True) -> None:
    for p in model.parameters():
        p.requires_grad = flag


ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T), dim=0)


def training_losses(model: nn.Module, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict) -> dict:
    """GaussianDiffusion.training_losses with learn_sigma=False: the MSE of the predicted noise, per sample."""
    noise = torch.randn_like(x)
    a = ALPHAS_CUMPROD[t].sqrt()[:, None, None, None]
    prediction = model(a * x + (1 - a**2).sqrt() * noise, t, **model_kwargs)
    return {"loss": ((prediction - noise) ** 2).mean(dim=(1, 2, 3))}


def _latents() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    prototypes = torch.randn(CLASSES, CHANNELS, SIZE, SIZE, generator=g)
    labels = torch.randint(0, CLASSES, (STEPS, BATCH), generator=g)
    return [(prototypes[y] + 0.3 * torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=g), y) for y in labels]


def _train(policy: str | None, *, track=True, averages=True, frozen=True, nan_latent_at=-1, nan_weight_after=-1):
    torch.manual_seed(0)
    model = TinyDiT()
    ema = deepcopy(model)  # Create an EMA of the model for use after training
    requires_grad(ema, not frozen)  # (not frozen: as timm's ModelEmaV3 and AveragedModel leave their copy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    guard = None
    if policy is not None:
        guard = keel.watch(model, opt, policy=policy, recovery=RecoveryConfig(snapshot_every=2, quiet_steps=0))
        if track:
            guard.track(ema, name="ema")
    try:
        update_ema(ema, model, decay=0)  # Ensure EMA is initialized with synced weights
        model.train()
        ema.eval()
        for step, (x, y) in enumerate(_latents()):
            if step == nan_latent_at:  # the fp16 VAE's NaN latent
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
            t = torch.randint(0, T, (x.shape[0],))
            loss = training_losses(model, x, t, dict(y=y))["loss"].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == nan_weight_after:
                with torch.no_grad():
                    model.blocks[0].mlp[0].weight[0, 0] = float("nan")  # a bad kernel / bit flip after the update
            if averages:
                update_ema(ema, model, decay=0.99)
            if step == STEPS // 2:  # sampling mid-run, as DiT's sample_every
                model.eval()
                with torch.no_grad():
                    model(torch.randn(2, CHANNELS, SIZE, SIZE), torch.tensor([999, 999]), torch.tensor([0, CLASSES]))
                model.train()
    finally:
        if guard is not None:
            guard.close()
    return model, ema, guard


def _finite(module: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("policy", ["observe", "recover"])
def test_a_healthy_run_under_keel_is_bit_identical_to_the_bare_loop_and_finds_nothing(policy: str):
    """adaLN-Zero's zeroed layers (no gradient into most of the model at step 0) raise no finding."""
    bare, bare_ema, _ = _train(None)
    observed, observed_ema, guard = _train(policy)
    assert guard is not None and not guard.decisions
    assert [f for f in guard.findings if f.severity != "info"] == []
    weights = zip(bare.parameters(), observed.parameters(), strict=True)
    averages = zip(bare_ema.parameters(), observed_ema.parameters(), strict=True)
    pairs = [*weights, *averages]
    assert all(torch.equal(a, b) for a, b in pairs)


def test_a_nan_latent_is_skipped_and_neither_the_weights_nor_the_ema_take_it():
    bare, bare_ema, _ = _train(None, nan_latent_at=4)
    assert not _finite(bare) and not _finite(bare_ema)
    model, ema, guard = _train("skip", nan_latent_at=4)
    assert guard is not None and [(d.step, d.action) for d in guard.decisions] == [(4, "skip")]
    assert _finite(model) and _finite(ema)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-as-dit", "requires-grad-as-timm"])
def test_a_rollback_names_the_unregistered_ema_it_left_holding_nan(frozen: bool):
    """h28 V: DiT's EMA (a deepcopy made before keel.watch, frozen) not given to guard.track: the rollback restored
    the model and said "actions: none needed" while the EMA — what DiT samples and evaluates with — held NaN for
    good, and nothing said so."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, ema, guard = _train("recover", track=False, frozen=frozen, nan_weight_after=4)
    assert guard is not None and [d.action for d in guard.decisions] == ["rollback"]
    assert _finite(model) and not _finite(ema)  # keel does not restore what it was not given ...
    named = [str(w.message) for w in caught if issubclass(w.category, KeelWarning) and "guard.track" in str(w.message)]
    assert len(named) == 1 and "TinyDiT" in named[0] and "NaN" in named[0]  # ... and now says so, once


@pytest.mark.parametrize("track", [True, False], ids=["ema-registered", "frozen-copy-unregistered"])
def test_a_rollback_names_no_copy_that_is_registered_or_finite(track: bool):
    """A registered EMA is restored by the rollback (DiT's, with the model); a frozen copy the loop never updates (a
    reference model, as a DPO loop's) stays finite and may be meant to stay: neither is named."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, ema, guard = _train("recover", track=track, averages=track, nan_weight_after=4)
    assert guard is not None and [d.action for d in guard.decisions] == ["rollback"]
    assert _finite(model) and _finite(ema)
    assert not [w for w in caught if issubclass(w.category, KeelWarning) and "guard.track" in str(w.message)]


def test_a_rollback_does_not_name_an_earlier_runs_model_or_ema_left_nan_in_the_process():
    """Found on a sweep in one process: the previous trial's NaN model, its NaN EMA (still referenced: the loop's
    variables) and a NaN copy no longer referenced were named as this run's EMA. None is: the loop does not update
    them."""
    earlier_model, earlier_ema = TinyDiT(), TinyDiT()
    requires_grad(earlier_ema, False)
    gone = TinyDiT()
    gone.itself = [gone]  # type: ignore[assignment]  # a reference cycle: only the collector frees it
    for left in (earlier_model, earlier_ema, gone):
        with torch.no_grad():
            left.final_linear.weight.fill_(float("nan"))
    del gone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train("recover", nan_weight_after=4)
    assert not [w for w in caught if issubclass(w.category, KeelWarning) and "guard.track" in str(w.message)]
    assert not _finite(earlier_model) and not _finite(earlier_ema)
