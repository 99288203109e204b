"""Column names of common training logs → keel signal keys, so the Guard's detectors read any log.

``grad_norm``, ``gradient_norm``, ``grad-norm`` and ``grad norm`` all mean ``grad/norm``; ``loss``,
``train_loss`` and Megatron's ``lm loss`` mean ``loss``; ``learning_rate`` means ``lr``. Names are compared
after lower-casing and turning every run of non-alphanumerics into ``_`` (TensorBoard's ``train/loss``
becomes ``train_loss``). A column already named by its keel key (``grad/norm``, from keel's own exports)
keeps it. Every other column keeps its own name, so nothing is dropped.

verl's PPO/GRPO metrics keep their own names too, but for those with a keel key: ``actor/pg_loss`` is ``loss``,
``actor/grad_norm`` and ``actor/lr`` are ``grad/norm`` and ``lr``, ``actor/entropy``, ``actor/kl_loss``,
``critic/score/mean`` and ``response_length/{mean,max,clip_ratio}`` are the ``rl/…`` keys — in any log of a verl
run (its console, W&B, TensorBoard or MLflow).

TRL's statistics (`keys.TRL_ALIASES`: ``rewards/margins`` → ``pref/margin``, ``entropy`` → ``rl/entropy``, …, also
with a ``train/`` prefix) are mapped in a log that has one of TRL's own ``x/y`` names (``rewards/margins``,
``clip_ratio/low_mean``, ``completions/mean_length``), or TRL 0.14–0.16's GRPO trio ``reward``, ``reward_std``,
``completion_length`` (its name for the mean length): there ``entropy``, ``kl`` and ``reward`` are a TRL
trainer's, while elsewhere such generic names keep their own.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from keel._core import keys

# keel key → accepted column names (normalized), in order of preference when several are present.
ALIASES: dict[str, tuple[str, ...]] = {
    keys.LOSS: (
        "loss",
        "train_loss",
        "training_loss",
        "lm_loss",
        "train_lm_loss",
        "loss_train",
        "train_loss_step",
        "train_loss_iter",
        "batch_loss",
        "train_batch_loss",
        "epoch_loss",
        "train_epoch_loss",
        "train_crossentropyloss",  # OLMo's train/CrossEntropyLoss
        "train_ce_loss",  # OLMo-core's train/CE loss
        "loss_train_total",  # Composer's loss/train/total
        "gpt_loss",  # OpenRLHF's SFT trainer
        "policy_loss",  # OpenRLHF's PPO actor (train/policy_loss in its W&B and TensorBoard logs; act_loss in its bar)
        "train_policy_loss",
        "act_loss",
        "learning_loss",  # MaxText's learning/loss (TensorBoard, its metrics_file JSON lines)
        "actor_pg_loss",  # verl's PPO/GRPO policy loss, actor/pg_loss (TRL's GRPO logs its own as loss)
    ),
    keys.GRAD_NORM: (
        "grad_norm",
        "gradient_norm",
        "grad_norm_total",
        "global_grad_norm",
        "total_grad_norm",
        "train_grad_norm",
        "grad_l2_norm",
        "gnorm",
        "grad_norm_global",
        "optim_total_grad_norm",  # OLMo's optim/total_grad_norm, OLMo-core's optim/total grad norm
        "l2_norm_grad_global",  # Composer's OptimizerMonitor: l2_norm/grad/global
        "actor_grad_norm",  # verl's actor/grad_norm, OpenRLHF's actor_grad_norm
        "learning_raw_grad_norm",  # MaxText: learning/raw_grad_norm before clipping, learning/grad_norm after
        "learning_grad_norm",
        "train_actor_grad_norm",
    ),
    keys.LR: (
        "lr",
        "learning_rate",
        "train_learning_rate",
        "train_lr",
        "lr_0",
        "lr_group_0",
        "optim_learning_rate_group0",  # OLMo's optim/learning_rate_group0
        "optim_lr_group_0",  # OLMo-core's optim/LR (group 0)
        # Composer's LRMonitor: lr-<optimizer class>/group0
        "lr_decoupledadamw_group0",
        "lr_decoupledlionw_group0",
        "lr_decoupledsgdw_group0",
        "lr_adamw_group0",
        "lr_adam_group0",
        "lr_sgd_group0",
        "learning_current_learning_rate",  # MaxText's learning/current_learning_rate
        "actor_lr",  # verl's actor/lr, OpenRLHF's actor_lr (train/actor_lr; act_lr in its progress bar)
        "train_actor_lr",
        "act_lr",
    ),
    keys.AMP_SCALE: ("loss_scale", "amp_scale", "grad_scale", "loss_scaler", "scaler_scale"),
    keys.STEP_TIME: (
        "step_time",
        "step_time_s",
        "time_per_step",
        "time_per_step_s",
        "iteration_time_s",
        "iter_time_s",
        "perf_step_time_seconds",  # MaxText's perf/step_time_seconds
    ),
    keys.VAL_LOSS: (
        "val_loss",
        "eval_loss",
        "validation_loss",
        "valid_loss",
        "test_loss",
        "eval_lm_loss",
        "validation_epoch_loss",
        "val_epoch_loss",
    ),
    # verl's PPO/GRPO metrics (verl/trainer/ppo/metric_utils.py, workers/actor/dp_actor.py): names no other tool uses
    keys.RL_ENTROPY: ("actor_entropy",),
    keys.RL_KL: ("actor_kl_loss",),  # the KL to the reference policy (use_kl_loss; low_var_kl, a clamped k3)
    keys.RL_REWARD_MEAN: ("critic_score_mean",),  # the reward function's score (critic/rewards adds the KL penalty)
    keys.RL_LENGTH_MEAN: ("response_length_mean",),
    keys.RL_LENGTH_MAX: ("response_length_max",),
    keys.RL_TRUNCATED: ("response_length_clip_ratio",),  # the fraction of responses at the length limit
}

# Columns that hold the optimizer step, in order of preference.
STEP_COLUMNS: tuple[str, ...] = (
    "step",
    "global_step",
    "train_global_step",
    "trainer_global_step",
    "iteration",
    "iter",
    "it",
    "steps",
    "num_steps",
    "train_step",
    "current_steps",  # LLaMA-Factory's trainer_log.jsonl
)


def normalize(name: str) -> str:
    """Lower-case, every run of non-alphanumerics → ``_``, no leading/trailing ``_``.

    Example:
        >>> normalize("Grad-Norm"), normalize("lm loss"), normalize("train/loss"), normalize("_step")
        ('grad_norm', 'lm_loss', 'train_loss', 'step')
    """
    # a console log names its few fields again on every line: short names are remembered (a bounded cache)
    return _normalize_short(name) if len(name) <= MAX_REMEMBERED_NAME else _normalize(name)


MAX_REMEMBERED_NAME = 256


def _normalize(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


_normalize_short = functools.lru_cache(maxsize=4096)(_normalize)


# TRL's statistic names, normalized, bare or with the "train/" prefix loggers add → keel key; and the ones that
# mark a TRL log (an "x/y" name of TRL's own, unlike a generic "entropy" or "reward").
TRL_COLUMNS = {prefix + normalize(name): key for name, key in keys.TRL_ALIASES.items() for prefix in ("", "train_")}
TRL_MARKERS = frozenset(prefix + normalize(n) for n in keys.TRL_ALIASES if "/" in n for prefix in ("", "train_"))
# TRL 0.14–0.16's GRPOTrainer named the mean completion length ``completion_length`` (``completions/mean_length``
# from 0.17) and logged none of the "x/y" names above; its ``reward``, ``reward_std`` and ``completion_length``
# together mark such a log. Mapped after the current names: a log with both (0.17+) reads the current one.
TRL_LEGACY_COLUMNS = {prefix + "completion_length": keys.RL_LENGTH_MEAN for prefix in ("", "train_")}
TRL_LEGACY_SIGNATURES = tuple(
    frozenset(prefix + n for n in ("reward", "reward_std", "completion_length")) for prefix in ("", "train_")
)


def find_step_column(names: Iterable[str]) -> str | None:
    """The name among ``names`` that holds steps (by `STEP_COLUMNS` preference), or None."""
    by_norm: dict[str, str] = {}
    for name in names:
        by_norm.setdefault(normalize(name), name)
    return next((by_norm[c] for c in STEP_COLUMNS if c in by_norm), None)


def map_columns(names: Iterable[str]) -> dict[str, str]:
    """Column name → signal key for every column: aliases mapped, everything else kept as it is.

    A keel key can be claimed once: the column already named by the key wins, then the first alias in
    `ALIASES` order; a losing column keeps its own name.

    Example:
        >>> map_columns(["step", "train_loss", "grad-norm", "learning_rate", "tflops"])["grad-norm"]
        'grad/norm'
        >>> map_columns(["loss", "train_loss"])
        {'loss': 'loss', 'train_loss': 'train_loss'}
    """
    names = list(dict.fromkeys(names))
    mapping = {name: name for name in names}
    by_norm: dict[str, str] = {}
    aliases_of = ALIASES
    normalized = set(map(normalize, names))
    if TRL_MARKERS.intersection(normalized) or any(sig <= normalized for sig in TRL_LEGACY_SIGNATURES):
        aliases_of = dict(ALIASES)
        for trl_name, key in (*TRL_COLUMNS.items(), *TRL_LEGACY_COLUMNS.items()):
            aliases_of[key] = (*aliases_of.get(key, ()), trl_name)
    claimed = {name for name in names if name in aliases_of}  # already named by their keel key
    for name in names:
        if name not in claimed:
            by_norm.setdefault(normalize(name), name)
    for key, aliases in aliases_of.items():
        if key in claimed:
            continue
        winner = next((by_norm[a] for a in aliases if a in by_norm), None)
        if winner is not None:
            mapping[winner] = key
            claimed.add(key)
    # A kept name must not collide with a key another column took (e.g. a raw column called "loss/x" is fine).
    taken = {key for name, key in mapping.items() if key != name}
    for name in names:
        if mapping[name] == name and name in taken:
            mapping[name] = f"{name} (column)"
    return mapping
