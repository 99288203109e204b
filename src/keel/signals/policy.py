"""Policy-gradient signals (GRPO, PPO, RLOO) and reward-model-ensemble signals, from tensors a loop already has.

`policy_signals` reduces one batch of sampled responses to keel's ``rl/…`` signals; `reward_ensemble_signals` reduces
k reward models' scores to ``rm/…``. Both return 0-d tensors still on the device, for
``guard.step(loss, signals=...)``; nothing is copied to the host here. Each key appears only when its inputs are given,
so a run without a reference model has no ``rl/kl`` and the KL detector stays silent.

| key                  | needs                                   | value                                              |
|----------------------|-----------------------------------------|----------------------------------------------------|
| `rl/entropy`         | ``logits`` (B·T·V) or ``entropies``     | token mean of −Σᵥ pᵥ log pᵥ (nats)                 |
| `rl/kl`              | ``logps``, ``ref_logps``                | token mean of k3 = e^(ref−logp) − (ref−logp) − 1   |
| `rl/clip_low`        | ``logps``, ``old_logps``, ``advantages``| share of tokens with ρ < 1 − ε_low and A < 0       |
| `rl/clip_high`       | the same                                | share of tokens with ρ > 1 + ε_high and A > 0      |
| `rl/advantage_mean`  | ``advantages``                          | mean over responses (1-d) or response tokens (2-d) |
| `rl/advantage_std`   | ``advantages``                          | standard deviation (unbiased) of the same          |
| `rl/length_mean`     | ``lengths`` or ``mask``                 | mean response length in tokens                     |
| `rl/length_max`      | the same                                | longest response                                   |
| `rl/truncated`       | ``truncated``, or ``max_length``        | share of responses cut at the limit                |
| `rl/reward_mean`     | ``rewards``                             | mean reward                                        |
| `rl/reward_std`      | ``rewards``                             | standard deviation (unbiased) over the batch       |
| `rl/zero_std_groups` | ``rewards``, ``group_size``             | share of prompt groups whose rewards are all equal |
| `rm/reward/<i>`      | ensemble ``rewards[members, batch]``    | member i's batch-mean reward                       |
| `rm/mean`            | the same                                | mean over members and batch                        |
| `rm/disagreement`    | the same                                | batch mean of the (unbiased) std across members    |

Cost: element-wise work and reductions over what is given, O(B·T) at most (O(B·T·V), one softmax, for the
entropy from ``logits``); B = responses, T = response tokens, V = vocabulary. Every step, no extra forward pass.

The definitions are TRL 1.16 GRPOTrainer's (``entropy``, ``kl``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``reward``, ``reward_std``, ``frac_reward_zero_std``, ``completions/mean_length``, ``completions/clipped_ratio``); the
ensemble statistics are Coste et al.'s. With one optimisation pass per batch (``num_iterations=1``) the ratio ρ
is 1 and both clip shares are 0 by construction: no clipping is normal there.

Non-finite values are measurements too: a NaN or ±Inf in a response token, advantage or reward makes the statistic
it enters NaN or ±Inf (a clip share or zero-std share with a NaN input is NaN, not a count that skips it); the k3 of
a log-ratio beyond ~88 overflows to +Inf in float32, as TRL's does (trl#3015). Values at masked-out positions are
ignored whatever they hold; a batch without response tokens gives NaN, and one value gives a NaN standard deviation.

References:
    Shao et al. 2024, DeepSeekMath (GRPO), arXiv 2402.03300. Yu et al. 2025, DAPO (clip-higher, dynamic sampling),
    arXiv 2503.14476. Schulman 2020, "Approximating KL divergence" (k3). Coste et al. 2024, "Reward Model Ensembles
    Help Mitigate Overoptimization", ICLR, arXiv 2310.02743.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from keel._core import keys
from keel.losses.kl_penalty import k3_kl
from keel.losses.policy_gradient import clipped_sides
from keel.signals._describe import describe


def policy_signals(
    *,
    mask: Tensor | None = None,
    logits: Tensor | None = None,
    entropies: Tensor | None = None,
    logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    old_logps: Tensor | None = None,
    advantages: Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    rewards: Tensor | None = None,
    group_size: int | None = None,
    lengths: Tensor | None = None,
    max_length: int | None = None,
    truncated: Tensor | None = None,
) -> dict[str, Tensor]:
    """keel's ``rl/…`` signals of one batch of sampled responses, as 0-d tensors on the inputs' device.

    Use it in a GRPO/PPO/RLOO loop and pass the result to ``guard.step(loss, signals=...)``; the detectors of
    `keel.detect.policy_detectors` read them. Give what the loop has; each key needs only its own inputs (module
    table). Token tensors are ``(batch, tokens)``, aligned with the response tokens; no host sync.

    Args:
        mask: ``(B, T)`` response-token mask (bool or 0/1); default: every position is a response token.
        logits: ``(B, T, V)`` the policy's logits at the positions that predict the response tokens.
        entropies: ``(B, T)`` per-token entropies, when the loop has them already (instead of ``logits``).
        logps: ``(B, T)`` log-probabilities of the sampled tokens under the current policy.
        ref_logps: ``(B, T)`` the same under the reference policy (k3 KL).
        old_logps: ``(B, T)`` the same under the policy that sampled them (the PPO ratio ρ).
        advantages: ``(B,)`` per response or ``(B, T)`` per token.
        epsilon_low: The clip range's lower side ε_low, in (0, 1).
        epsilon_high: Its upper side ε_high > 0 (DAPO's clip-higher: 0.28); default ``epsilon_low``.
        rewards: ``(N,)`` one reward per response; groups of ``group_size`` consecutive responses share a prompt.
        group_size: Responses per prompt (GRPO's ``num_generations``), >= 2, dividing N.
        lengths: ``(L,)`` response lengths in tokens; default: the mask's row sums.
        max_length: The generation limit; a response this long counts as truncated.
        truncated: ``(L,)`` bool, True where the response was cut (no end-of-sequence token).

    Returns:
        Signal key → 0-d detached tensor (float32, or float64 for float64 inputs).

    Raises:
        ValueError: nothing to measure, an input of the wrong shape, dtype or device, both ``logits`` and
            ``entropies``, ``ref_logps``/``old_logps`` without ``logps``, a bad ε, group size or length limit.

    Example:
        >>> import torch
        >>> from keel._core import keys
        >>> out = policy_signals(rewards=torch.tensor([1.0, 1.0, 0.0, 1.0]), group_size=2,
        ...                      lengths=torch.tensor([5, 8, 8, 3]), max_length=8)
        >>> [round(out[k].item(), 4) for k in (keys.RL_REWARD_MEAN, keys.RL_ZERO_STD_GROUPS, keys.RL_TRUNCATED)]
        [0.75, 0.5, 0.5]
    """
    out: dict[str, Tensor] = {}
    _policy_tokens(out, mask, logits, entropies, logps, ref_logps, old_logps, advantages, epsilon_low, epsilon_high)
    _policy_lengths(out, mask, lengths, max_length, truncated)
    if rewards is not None:
        r = _real("rewards", rewards, dims=(1,), floating=True)
        out[keys.RL_REWARD_MEAN], out[keys.RL_REWARD_STD] = _mean_std(r, None)
        if group_size is not None:
            out[keys.RL_ZERO_STD_GROUPS] = _zero_std_share(r, group_size)
    elif group_size is not None:
        raise ValueError(f"group_size={group_size!r} without rewards; allowed: group_size with rewards, or neither")
    if not out:
        raise ValueError("policy_signals(): nothing to measure; allowed: at least one of the inputs in the docstring")
    return out


def reward_ensemble_signals(rewards: Tensor) -> dict[str, Tensor]:
    """Per-member mean rewards, the ensemble mean and the disagreement of k reward models on one batch.

    Disagreement is the batch mean of the standard deviation across members (unbiased, as Coste et al.'s PPO
    ensembles use ``torch.var``). `keel.detect.RewardOverOptimizationDetector` reads the ensemble mean against the
    proxy reward the policy is trained on (a gain the ensemble does not confirm), and the disagreement when asked
    (``disagreement=True``). Members are emitted as ``rm/reward/<i>``.

    Args:
        rewards: ``(members, batch)`` floating scores, members >= 2, batch >= 1.

    Raises:
        ValueError: any other shape or dtype.

    Example:
        >>> import torch
        >>> from keel._core import keys
        >>> out = reward_ensemble_signals(torch.tensor([[1.0, 2.0], [3.0, 2.0]]))
        >>> out[keys.per_param(keys.RM_REWARD_PER_MEMBER, "1")], out[keys.RM_MEAN], out[keys.RM_DISAGREEMENT]
        (tensor(2.5000), tensor(2.), tensor(0.7071))
    """
    r = _real("rewards", rewards, dims=(2,), floating=True)
    if r.shape[0] < 2 or r.shape[1] < 1:
        raise ValueError(
            f"rewards of shape {tuple(r.shape)}; allowed: (members, batch) with members >= 2 and batch >= 1"
        )
    out = {keys.per_param(keys.RM_REWARD_PER_MEMBER, str(i)): member.mean() for i, member in enumerate(r)}
    out[keys.RM_MEAN] = r.mean()
    out[keys.RM_DISAGREEMENT] = r.std(dim=0, correction=1).mean()
    return out


def _policy_tokens(
    out: dict[str, Tensor],
    mask: Tensor | None,
    logits: Tensor | None,
    entropies: Tensor | None,
    logps: Tensor | None,
    ref_logps: Tensor | None,
    old_logps: Tensor | None,
    advantages: Tensor | None,
    epsilon_low: float,
    epsilon_high: float | None,
) -> None:
    """The token-level keys: entropy, KL, clip shares, advantages."""
    if logits is not None and entropies is not None:
        raise ValueError("logits and entropies are both given; allowed: one of them (entropies are read as given)")
    for name, value in (("ref_logps", ref_logps), ("old_logps", old_logps)):
        if value is not None and logps is None:
            raise ValueError(f"{name} without logps; allowed: {name} with logps (the current policy's), or neither")
    low, high = _epsilons(epsilon_low, epsilon_high)
    token = {n: v for n, v in (("entropies", entropies), ("logps", logps)) if v is not None}
    token.update({n: v for n, v in (("ref_logps", ref_logps), ("old_logps", old_logps)) if v is not None})
    checked = {name: _real(name, value, dims=(2,), floating=True) for name, value in token.items()}
    if logits is not None:
        z = _real("logits", logits, dims=(3,), floating=True)
        p = torch.softmax(z, dim=-1)
        checked["entropies"] = -torch.special.xlogy(p, p).sum(dim=-1)  # 0·log 0 = 0 for masked vocabulary entries
    if mask is not None:
        checked["mask"] = _real("mask", mask, dims=(2,), floating=False)
    adv = _real("advantages", advantages, dims=(1, 2), floating=True) if advantages is not None else None
    _same_shape(checked, adv)
    keep = checked["mask"] != 0 if "mask" in checked else None
    if "entropies" in checked:
        out[keys.RL_ENTROPY] = _mean(checked["entropies"], keep)
    if "ref_logps" in checked:
        out[keys.RL_KL] = _mean(k3_kl(checked["logps"], checked["ref_logps"]), keep)
    if "old_logps" in checked and adv is not None:
        ratio = torch.exp(checked["logps"] - checked["old_logps"])
        a = adv[:, None] if adv.dim() == 1 else adv  # (B,) per response → (B, 1), shared by its tokens
        unknown = ratio.isnan() | a.isnan()
        for key, clipped in zip((keys.RL_CLIP_LOW, keys.RL_CLIP_HIGH), clipped_sides(ratio, a, low, high), strict=True):
            share = torch.where(unknown, torch.full_like(ratio, math.nan), clipped.to(ratio.dtype))
            out[key] = _mean(share, keep)
    if adv is not None:
        per_token = keep if adv.dim() == 2 else None
        out[keys.RL_ADVANTAGE_MEAN], out[keys.RL_ADVANTAGE_STD] = _mean_std(adv, per_token)


def _policy_lengths(
    out: dict[str, Tensor],
    mask: Tensor | None,
    lengths: Tensor | None,
    max_length: int | None,
    truncated: Tensor | None,
) -> None:
    """The response-length keys."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length={max_length!r}; allowed: an int >= 1 (the generation limit in tokens), or None")
    if lengths is not None:
        n = _real("lengths", lengths, dims=(1,), floating=False)
    elif mask is not None:
        n = (_real("mask", mask, dims=(2,), floating=False) != 0).sum(dim=-1)
    else:
        n = None
    if n is not None:
        n = n.to(torch.float64 if n.dtype == torch.float64 else torch.float32)
        out[keys.RL_LENGTH_MEAN], out[keys.RL_LENGTH_MAX] = n.mean(), n.amax()
    if truncated is not None:
        cut = _real("truncated", truncated, dims=(1,), floating=False)
        if n is not None and cut.shape != n.shape:
            raise ValueError(f"truncated of shape {tuple(cut.shape)}, lengths {tuple(n.shape)}; allowed: the same")
        out[keys.RL_TRUNCATED] = (cut != 0).float().mean()
    elif max_length is not None:
        if n is None:
            raise ValueError("max_length without lengths or mask; allowed: max_length with lengths or mask, or None")
        out[keys.RL_TRUNCATED] = torch.where(n.isnan(), n, (n >= max_length).to(n.dtype)).mean()


def _zero_std_share(r: Tensor, group_size: int) -> Tensor:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or len(r) % group_size:
        raise ValueError(
            f"group_size={group_size!r} with {len(r)} rewards; allowed: an int >= 2 that divides the number of rewards"
        )
    groups = r.reshape(-1, group_size)  # (prompts, group_size): consecutive responses share a prompt
    flat = (groups.amax(dim=1) == groups.amin(dim=1)).to(r.dtype)
    return torch.where(groups.isnan().any(dim=1), torch.full_like(flat, math.nan), flat).mean()


def _mean(x: Tensor, keep: Tensor | None) -> Tensor:
    """Mean of ``x`` over the ``keep`` positions (all when None); masked values never enter."""
    if keep is None:
        return x.mean()
    return torch.where(keep, x, 0).sum() / keep.sum().to(x.dtype)


def _mean_std(x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std of ``x`` over the ``keep`` positions (all when None); masked values never enter."""
    mean = _mean(x, keep)
    n = torch.tensor(x.numel(), dtype=x.dtype, device=x.device) if keep is None else keep.sum().to(x.dtype)
    deviations = (x - mean) ** 2
    spread = deviations.sum() if keep is None else torch.where(keep, deviations, 0).sum()
    return mean, torch.sqrt(spread / (n - 1))  # one value: 0/0 = NaN (torch.std would warn)


def _epsilons(low: object, high: object) -> tuple[float, float]:
    if isinstance(low, bool) or not isinstance(low, int | float) or not 0 < low < 1:
        raise ValueError(f"epsilon_low={low!r}; allowed: a number in (0, 1), e.g. 0.2")
    if high is None:
        return float(low), float(low)
    if isinstance(high, bool) or not isinstance(high, int | float) or not (math.isfinite(high) and high > 0):
        raise ValueError(f"epsilon_high={high!r}; allowed: a finite number > 0 (DAPO: 0.28), or None for epsilon_low")
    return float(low), float(high)


def _real(name: str, value: object, *, dims: tuple[int, ...], floating: bool) -> Tensor:
    """``value`` detached (floating ones in at least float32), or one ValueError naming ``name`` and the allowed."""
    if not (
        isinstance(value, Tensor)
        and value.dim() in dims
        and not value.is_complex()
        and (value.is_floating_point() or not floating)
    ):
        what = "floating" if floating else "real or bool"
        shape = " or ".join(f"{d}-d" for d in dims)
        raise ValueError(f"{name}={describe(value)}; allowed: a {shape} {what} tensor (see policy_signals' Args)")
    t = value.detach()
    return t.to(torch.promote_types(t.dtype, torch.float32)) if floating else t


def _same_shape(token: dict[str, Tensor], adv: Tensor | None) -> None:
    """Token tensors share (B, T) and one device; advantages are (B,) or (B, T) on it."""
    shapes = {name: (tuple(t.shape[:2]), t.device) for name, t in token.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} {s} on {d}" for n, (s, d) in shapes.items())
        raise ValueError(f"token tensors of different (B, T) or device: {listed}; allowed: one (B, T), one device")
    if adv is None or not shapes:
        return
    (b, t), device = next(iter(shapes.values()))
    if adv.shape not in ((b,), (b, t)) or adv.device != device:
        raise ValueError(
            f"advantages of shape {tuple(adv.shape)} on {adv.device}; allowed: ({b},) or ({b}, {t}) on {device}"
        )
