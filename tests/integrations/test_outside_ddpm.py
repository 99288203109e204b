"""keel.watch on diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` loop, built by hand (the
test environment has no diffusers): a small UNet-ish conv net with a timestep embedding predicts the noise DDPM's
forward process added (MSE), clipping, a warmed-up cosine LR, and diffusers' ``EMAModel`` shape — an object, not an
``nn.Module``, whose ``step(parameters)`` follows each update and whose ``state_dict()`` returns its shadow tensors by
reference. Tried with diffusers 0.42.1 itself (UNet2DModel, DDPMScheduler, EMAModel) in h25 C4: the same results.

keel's two lines after the model, optimizer and scheduler: ``guard = keel.watch(model, optimizer, lr_scheduler, ...)``
and ``guard.track(ema_model, name="ema")``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import keel
from keel.recover import RecoveryConfig

STEPS, BATCH, SIZE, T = 8, 4, 8, 1000


class TinyUNet(nn.Module):
    """Down, middle, up with a skip, GroupNorm and a sinusoidal timestep embedding added to the features."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.conv_in = nn.Conv2d(3, width, 3, padding=1)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.mid = nn.Sequential(nn.GroupNorm(4, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
        self.up = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.conv_out = nn.Sequential(nn.GroupNorm(4, 2 * width), nn.SiLU(), nn.Conv2d(2 * width, 3, 3, padding=1))
        self.width = width

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
        emb = self.time(torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1))
        h0 = self.conv_in(x) + emb[:, :, None, None]
        h = self.up(self.mid(self.down(h0)))
        return self.conv_out(torch.cat([h, h0], dim=1))


class EMAModelShaped:
    """diffusers.training_utils.EMAModel's interface: ``step(parameters)`` with its warm-up decay, and a
    ``state_dict()`` that returns the shadow tensors themselves (its docstring: "a reference to the state and not its
    copy"); ``load_state_dict`` takes the list it is given."""

    def __init__(self, parameters, decay: float = 0.9999) -> None:
        self.shadow_params = [p.detach().clone() for p in parameters]
        self.decay, self.optimization_step = decay, 0

    @torch.no_grad()
    def step(self, parameters) -> None:
        self.optimization_step += 1
        decay = min(self.decay, 1 - (1 + self.optimization_step) ** -0.75)  # use_ema_warmup, power 3/4
        for shadow, p in zip(self.shadow_params, parameters, strict=True):
            shadow.sub_((1 - decay) * (shadow - p))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "optimization_step": self.optimization_step, "shadow_params": self.shadow_params}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.optimization_step = state["decay"], state["optimization_step"]
        self.shadow_params = state["shadow_params"]


def _images(count: int) -> torch.Tensor:
    """Discs on a blank background in [-1, 1], three channels."""
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    centre, radius = torch.rand(count, 2, generator=g) - 0.5, 0.3 + 0.3 * torch.rand(count, generator=g)
    disc = (xx - centre[:, :1, None]) ** 2 + (yy - centre[:, 1:, None]) ** 2 < radius[:, None, None] ** 2
    return (disc.float()[:, None].expand(count, 3, SIZE, SIZE) * 2 - 1).contiguous()


def _train(policy: str | None, *, nan_image_at: int = -1, nan_weight_after: int = -1):
    torch.manual_seed(0)
    model = TinyUNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.95, 0.999), weight_decay=1e-6)
    warmup = 2
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(  # diffusers' get_scheduler("cosine", num_warmup_steps=2)
        optimizer, lambda s: s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / STEPS))
    )
    ema_model = EMAModelShaped(model.parameters())
    guard = None
    if policy is not None:
        recovery = RecoveryConfig(snapshot_every=2, quiet_steps=0)
        guard = keel.watch(model, optimizer, lr_scheduler, policy=policy, recovery=recovery)
        guard.track(ema_model, name="ema")
    betas = torch.linspace(1e-4, 0.02, T)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    g = torch.Generator().manual_seed(2)
    data = _images(STEPS * BATCH)
    for step in range(STEPS):
        clean_images = data[step * BATCH : (step + 1) * BATCH]
        if step == nan_image_at:
            clean_images = clean_images.clone()
            clean_images[0, 0, 0, 0] = float("nan")
        noise = torch.randn(clean_images.shape, generator=g)
        timesteps = torch.randint(0, T, (BATCH,), generator=g)
        a = alphas_cumprod[timesteps].sqrt()[:, None, None, None]
        noisy_images = a * clean_images + (1 - a**2).sqrt() * noise  # DDPMScheduler.add_noise
        loss = F.mse_loss(model(noisy_images, timesteps.float()), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        if step == nan_weight_after:
            with torch.no_grad():
                model.conv_in.weight[0, 0, 0, 0] = float("nan")  # a bad kernel / bit flip after the update
        ema_model.step(model.parameters())
    if guard is not None:
        guard.close()
    return model, ema_model, guard


def _finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors)


def test_observe_is_bit_identical_to_the_bare_loop_weights_and_ema():
    bare, bare_ema, _ = _train(None)
    observed, observed_ema, guard = _train("observe")
    assert guard is not None and not guard.decisions
    weights = zip(bare.parameters(), observed.parameters(), strict=True)
    averages = zip(bare_ema.shadow_params, observed_ema.shadow_params, strict=True)
    pairs = [*weights, *averages]
    assert all(torch.equal(a, b) for a, b in pairs)


def test_a_nan_image_is_skipped_and_neither_the_weights_nor_the_ema_take_it():
    bare, bare_ema, _ = _train(None, nan_image_at=4)
    assert not _finite(bare.parameters()) and not _finite(bare_ema.shadow_params)  # the bare run is lost
    model, ema_model, guard = _train("skip", nan_image_at=4)
    assert guard is not None and [(d.step, d.action) for d in guard.decisions] == [(4, "skip")]
    assert _finite(model.parameters()) and _finite(ema_model.shadow_params)


def test_a_rollback_restores_a_diffusers_style_ema_with_the_model():
    """h25 C4: an EMA that is not an nn.Module (diffusers' EMAModel) was taken for a data position, which a rollback
    does not restore: the EMA kept the NaN the model was rolled back from."""
    model, ema_model, guard = _train("recover", nan_weight_after=4)
    assert guard is not None and [d.action for d in guard.decisions] == ["rollback"]
    assert _finite(model.parameters())
    assert _finite(ema_model.shadow_params)
