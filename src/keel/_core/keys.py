"""Signal keys: stable slash paths shared by probes, detectors, the store and the report.

Every key keel emits or reads is declared here once and imported everywhere else (``tests/_core/test_keys.py``
finds a retyped literal). A key ending in ``/`` names a family, one value per parameter, layer, block, head or
rank: ``grad/norm/`` holds one value per parameter, stored as ``grad/norm/<parameter name>``. The name says which
(``_PER_PARAM``, ``_PER_LAYER``, ...). Each probe's docstring tables the keys it emits, their cost and cadence.
"""

from __future__ import annotations

# The loop's own values (signals/loss.py, grad_norm.py, param_norm.py, update_ratio.py; the Guard)
LOSS = "loss"
GRAD_NORM = "grad/norm"
GRAD_NORM_PER_PARAM = "grad/norm/"
GRAD_CLIPPED_NORM = "grad/clipped_norm"  # after the loop's own clipping, when it clips (Guard.step(grad_norm=))
PARAM_NORM = "param/norm"
PARAM_NORM_PER_PARAM = "param/norm/"
UPDATE_NORM = "update/norm"
UPDATE_RATIO = "update/ratio"
UPDATE_RATIO_PER_PARAM = "update/ratio/"
LR = "lr"
STEP_TIME = "time/step"
AMP_SCALE = "amp/scale"
VAL_LOSS = "val/loss"  # read from a log by keel doctor; a loop's validation loss

# Attention (signals/attn_logits.py, attn_entropy.py)
ATTN_MAX_LOGIT = "attn/max_logit"
ATTN_MAX_LOGIT_PER_LAYER = "attn/max_logit/"
ATTN_ENTROPY = "attn/entropy"
ATTN_ENTROPY_PER_LAYER = "attn/entropy/"
ATTN_HEAD_ENTROPY_PER_HEAD = "attn/head_entropy/"  # stored as attn/head_entropy/<layer>/h<i>

# Output logits (signals/output_logits.py)
LOGITS_LOG_Z = "logits/log_z"
LOGITS_LOG_Z_MAX = "logits/log_z_max"
LOGITS_LOG_Z_MIN = "logits/log_z_min"
LOGITS_RMS = "logits/rms"
LOGITS_MEAN = "logits/mean"
LOGITS_SOFTMAX_COLLAPSE = "logits/softmax_collapse"
LOGITS_ZERO_LOSS = "logits/zero_loss"

# Gradient-weight alignment (signals/grad_weight_cos.py)
GRAD_WEIGHT_COS = "grad/weight_cos"
GRAD_WEIGHT_COS_PER_PARAM = "grad/weight_cos/"

# Activations (signals/activation_rms.py)
ACT_RMS = "act/rms"
ACT_RMS_PER_BLOCK = "act/rms/"
ACT_MAX_ABS = "act/max_abs"
ACT_MAX_ABS_PER_BLOCK = "act/max_abs/"
ACT_FORMAT_MAX = "act/format_max"  # largest finite value of the format block outputs are held in (autocast's, under it)

# Normalization layers' running statistics (signals/norm_stats.py)
NORM_RUNNING_VAR_JUMP = "norm/running_var_jump"  # max over layers of ‖running_var‖ / its value after the last update
NORM_RUNNING_VAR_JUMP_PER_LAYER = "norm/running_var_jump/"

# Adam's ε (signals/adam_eps.py)
ADAM_UPDATE_RMS = "adam/update_rms"
ADAM_EPS_DOMINATED = "adam/eps_dominated"
ADAM_EPS_DOMINATED_PER_PARAM = "adam/eps_dominated/"

# Low-precision numerics (signals/numerics.py): each over the watched activations, gradients and logits
NUMERICS_HEADROOM = "numerics/headroom"  # min over tensors of log2(dtype max / amax): doublings left before overflow
NUMERICS_HEADROOM_PER_NAME = "numerics/headroom/"
NUMERICS_NEAR_MAX = "numerics/near_max"  # max over tensors of the fraction of |x| within a factor 2 of the dtype max
NUMERICS_NEAR_MAX_PER_NAME = "numerics/near_max/"
NUMERICS_UNDERFLOW = "numerics/underflow"  # max over tensors of the fraction of non-zeros below the smallest normal
NUMERICS_UNDERFLOW_PER_NAME = "numerics/underflow/"

# Loss scaling (guard: the GradScaler's device scale, read with the step's other measurements)
AMP_OVERFLOW = "amp/overflow"  # 1 on a step whose scaled gradients overflowed (the scaler skipped it and backed off)

# Quantization-aware training (signals/weight_oscillation.py)
QAT_OSCILLATION = "qat/oscillation"  # max over layers of the share of quantized weights oscillating (OFQ EMA)
QAT_OSCILLATION_PER_LAYER = "qat/oscillation/"

# Curvature (signals/sharpness.py)
CURVATURE_SHARPNESS = "curvature/sharpness"
CURVATURE_TRACE = "curvature/trace"
CURVATURE_PRECONDITIONED_SHARPNESS = "curvature/preconditioned_sharpness"
CURVATURE_MARGIN = "curvature/margin"

# Opposing signals on a fixed probe set (signals/opposing_signals.py; Rosenberg & Risteski 2023)
OPPOSING_ROSE = "opposing/rose"  # fraction of probe examples whose loss rose since the last measurement
OPPOSING_OPPOSITION = "opposing/opposition"  # min(mean rise of the top-k risers, mean fall of the top-k fallers)
OPPOSING_ANTIPHASE = "opposing/antiphase"  # correlation of the two groups' mean losses over the history (-1: antiphase)

# One value per rank under torchrun (guard/distributed.py writes them, guard/rank_outlier.py reads them)
RANK_LOSS_PER_RANK = "rank/loss/"
RANK_GRAD_NORM_PER_RANK = "rank/grad/norm/"
RANK_GRAD_LOCAL_NORM_PER_RANK = "rank/grad/local_norm/"
RANK_GRAD_COS_PER_RANK = "rank/grad/cos/"

# One value per data source (signals/source_gradients.py writes them as 0-d signals, detect/source_drift.py reads them)
SOURCE_LOSS_PER_SOURCE = "source/loss/"  # mean loss of the source's examples in the batch
SOURCE_GRAD_NORM_PER_SOURCE = "source/grad_norm/"  # mean per-example gradient norm of the source's examples
SOURCE_GRAD_COS_PER_SOURCE = "source/grad_cos/"  # cosine of the source's gradient with the rest of the batch's
SOURCE_STEP_LOSS_PER_SOURCE = "source/step_loss/"  # every step, the loop's own mean loss of the source's examples
SOURCE_STEP_COUNT_PER_SOURCE = "source/step_count/"  # every step, how many of the batch's examples are the source's


# Preference optimisation (DPO and its kin): keel.signals.preference_signals, or TRL's DPOTrainer statistics.
# Log-probabilities are of the response given the prompt; a "reward" is DPO's implicit β·(log π − log π_ref).
PREF_CHOSEN_LOGP = "pref/chosen_logp"  # batch mean of the summed response log-probability, log π(y⁺|x)
PREF_REJECTED_LOGP = "pref/rejected_logp"
PREF_CHOSEN_LOGP_TOKEN = "pref/chosen_logp_token"  # batch mean of the per-token mean log-probability
PREF_REJECTED_LOGP_TOKEN = "pref/rejected_logp_token"
PREF_CHOSEN_REWARD = "pref/chosen_reward"  # β·(log π(y⁺|x) − log π_ref(y⁺|x)), batch mean
PREF_REJECTED_REWARD = "pref/rejected_reward"
PREF_MARGIN = "pref/margin"  # batch mean of chosen reward − rejected reward
PREF_ACCURACY = "pref/accuracy"  # fraction of pairs with chosen reward > rejected reward
# Likelihood displacement (Razin et al. 2025): per-token log π(y⁺|x) − log π_ref(y⁺|x), batch mean; < 0 = displaced
PREF_CHOSEN_DISPLACEMENT = "pref/chosen_displacement"

# Policy-gradient RL (GRPO, PPO, RLOO): keel.signals.policy_signals, or TRL's GRPOTrainer statistics
RL_ENTROPY = "rl/entropy"  # token-mean policy entropy over response tokens (nats)
RL_KL = "rl/kl"  # token-mean KL to the reference policy (k3 estimator)
RL_CLIP_LOW = "rl/clip_low"  # fraction of tokens with ratio < 1 − ε_low and advantage < 0
RL_CLIP_HIGH = "rl/clip_high"  # fraction of tokens with ratio > 1 + ε_high and advantage > 0
RL_ADVANTAGE_MEAN = "rl/advantage_mean"
RL_ADVANTAGE_STD = "rl/advantage_std"
RL_LENGTH_MEAN = "rl/length_mean"  # response length in tokens
RL_LENGTH_MAX = "rl/length_max"
RL_TRUNCATED = "rl/truncated"  # fraction of responses cut at the length limit (no EOS)
RL_REWARD_MEAN = "rl/reward_mean"
RL_REWARD_STD = "rl/reward_std"
RL_ZERO_STD_GROUPS = "rl/zero_std_groups"  # fraction of prompt groups whose rewards are all equal (DAPO)
RL_GOLD_REWARD = "rl/gold_reward"  # a held-out ("gold") reward of the same responses, when the loop has one

# Reward-model ensembles (keel.signals.reward_ensemble_signals): one value per member, their mean and spread
RM_REWARD_PER_MEMBER = "rm/reward/"  # stored as rm/reward/<member index>, batch mean
RM_MEAN = "rm/mean"
RM_DISAGREEMENT = "rm/disagreement"  # batch mean of the std across members

# Evaluation during training (Guard.evaluate / Guard.record_eval; HF and Lightning adapters): one family per eval
EVAL_PER_NAME = "eval/"  # stored as eval/<name> (one number) or eval/<name>/<metric> (a dict of metrics)
PHASE_INDEX = "phase/index"  # 0, 1, 2, … : which phase / task the step trains on (Guard.phase)

# Continual-learning metrics over the evals tied to tasks (De Lange et al. 2023; Avalanche's forgetting, BWT)
CONTINUAL_MIN_ACC = "continual/min_acc"  # mean over finished tasks of the lowest value seen after each finished
CONTINUAL_WC_ACC = "continual/wc_acc"  # (1/k)·current task + (1 − 1/k)·min-ACC
CONTINUAL_WF_PER_WINDOW = "continual/wf/"  # windowed forgetting, stored as continual/wf/<w> (w = 10, 100)
CONTINUAL_WP_PER_WINDOW = "continual/wp/"  # windowed plasticity, stored as continual/wp/<w>
CONTINUAL_FORGETTING = "continual/forgetting"  # mean over finished tasks of (value right after its phase − latest)
CONTINUAL_BWT = "continual/bwt"  # backward transfer = − forgetting
CONTINUAL_PERFORMANCE_MAINTENANCE = "continual/performance_maintenance"  # l2metrics: mean(later − phase-end eval)

# Evaluation stability (BOSE): can the eval rank checkpoints? stored as <key>/<eval key>
EVAL_RANK_TAU_PER_EVAL = "eval_stability/rank_tau/"  # Kendall τ-b of checkpoint rankings across bootstrap resamples
EVAL_MONOTONICITY_PER_EVAL = "eval_stability/monotonicity/"  # Kendall τ-b of checkpoint order vs the eval's values

# LoRA adapters (peft's lora_A / lora_B, keel.signals LoRA probe): per adapted module, and the run's maxima
LORA_A_NORM_PER_MODULE = "lora/a_norm/"
LORA_B_NORM_PER_MODULE = "lora/b_norm/"
LORA_DELTA_NORM_PER_MODULE = "lora/delta_norm/"  # ‖scaling · B·A‖_F, the adapter's weight update
LORA_DELTA_NORM_MAX = "lora/delta_norm_max"
LORA_DELTA_RATIO_MAX = "lora/delta_ratio_max"  # max over modules of ‖ΔW‖ / ‖W_base‖

# Mixture of experts (keel.signals router probe): per MoE layer, and the run's extreme over layers. Balanced = 1 for
# the load-balancing loss and the imbalance (Megatron / OLMo-core convention; Hugging Face's aux loss ÷ k).
MOE_ROUTER_MAX_LOGIT = "moe/router_max_logit"  # max over layers of the largest router logit
MOE_ROUTER_MAX_LOGIT_PER_LAYER = "moe/router_max_logit/"
MOE_ROUTER_Z = "moe/router_z"  # max over layers of mean_tokens(logsumexp(router logits))², the unscaled z-loss
MOE_ROUTER_Z_PER_LAYER = "moe/router_z/"
MOE_GATE_ENTROPY = "moe/gate_entropy"  # min over layers of the mean routing entropy ÷ log E (1 uniform, 0 one-hot)
MOE_GATE_ENTROPY_PER_LAYER = "moe/gate_entropy/"
MOE_LOAD_IMBALANCE = "moe/load_imbalance"  # max over layers of max/mean tokens per expert (1 balanced, E/k collapsed)
MOE_LOAD_IMBALANCE_PER_LAYER = "moe/load_imbalance/"
MOE_LOAD_CV = "moe/load_cv"  # max over layers of the coefficient of variation of tokens per expert
MOE_LOAD_CV_PER_LAYER = "moe/load_cv/"
MOE_DEAD_EXPERTS = "moe/dead_experts"  # experts (all layers) that received no token this step
MOE_DEAD_EXPERTS_PER_LAYER = "moe/dead_experts/"
MOE_DROPPED = "moe/dropped"  # max over layers of the fraction of token assignments dropped by capacity (0 dropless)
MOE_DROPPED_PER_LAYER = "moe/dropped/"
MOE_AUX_LOSS = "moe/aux_loss"  # the Switch load-balancing loss, unscaled, balanced = 1
MOE_EXPERTS = "moe/experts"  # experts per router, E (the largest over routers): the imbalance of a collapse is E/k
MOE_TOP_K = "moe/top_k"  # experts chosen per token, k (the smallest over routers)

# TRL's own statistic names (trl 1.16 DPOTrainer, GRPOTrainer) → keel's keys: the TRL adapter reads TRL's values
# under these names rather than measuring them twice, and `keel doctor` reads TRL logs with the same table.
TRL_ALIASES: dict[str, str] = {
    "logps/chosen": PREF_CHOSEN_LOGP,
    "logps/rejected": PREF_REJECTED_LOGP,
    "rewards/chosen": PREF_CHOSEN_REWARD,
    "rewards/rejected": PREF_REJECTED_REWARD,
    "rewards/margins": PREF_MARGIN,
    "rewards/accuracies": PREF_ACCURACY,
    "entropy": RL_ENTROPY,
    "kl": RL_KL,
    "clip_ratio/low_mean": RL_CLIP_LOW,
    "clip_ratio/high_mean": RL_CLIP_HIGH,
    "reward": RL_REWARD_MEAN,
    "reward_std": RL_REWARD_STD,
    "frac_reward_zero_std": RL_ZERO_STD_GROUPS,
    "completions/mean_length": RL_LENGTH_MEAN,
    "completions/max_length": RL_LENGTH_MAX,
    "completions/clipped_ratio": RL_TRUNCATED,
}


def per_param(family: str, name: str) -> str:
    """The stored key of one member of a family: ``per_param("grad/norm/", "fc.weight")``.

    Example:
        >>> per_param(GRAD_NORM_PER_PARAM, "fc.weight")
        'grad/norm/fc.weight'
    """
    if not (isinstance(family, str) and family.endswith("/")):
        raise ValueError(f"family={family!r} is not a per-parameter family (must end with '/')")
    return family + name
