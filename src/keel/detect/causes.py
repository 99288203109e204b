"""The catalogue of named causes: what each instability is, and the advice for it, ranked, each with its source.

Detectors put a cause's advice into their findings (``evidence["advice"]``) and `diagnose` uses the
same table, so the run store, the CLI and the report all say the same thing. Ranking: what
removes the mechanism first, then what only makes it less likely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keel._core.finding import Severity


@dataclass(frozen=True, kw_only=True)
class Advice:
    """One piece of advice: what to do, how to do it with keel (when keel has it), and where it comes from."""

    action: str
    source: str
    how: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"action": self.action, "how": self.how, "source": self.source}


@dataclass(frozen=True, kw_only=True)
class Cause:
    """A named instability: a title, the mechanism in one or two sentences, and ranked advice."""

    kind: str
    title: str
    mechanism: str
    advice: tuple[Advice, ...] = field(default=())
    warning_advice: tuple[Advice, ...] = field(default=())  # when it never went past a warning; empty: ``advice``

    def advice_for(self, severity: Severity | None = None) -> tuple[Advice, ...]:
        """The ranked advice for a cause whose worst finding had ``severity``.

        A warning is a sustained rise that no policy acts on, so advice about the update a critical finding
        would skip ("skip the update") does not fit it; a cause with ``warning_advice`` gives that instead.
        """
        return self.warning_advice if severity == "warning" and self.warning_advice else self.advice

    def advice_text(self, top: int = 3, severity: Severity | None = None) -> str:
        """The first ``top`` pieces of advice, one sentence each: ``1. action (source).``"""
        return " ".join(f"{i}. {r.action} ({r.source})." for i, r in enumerate(self.advice_for(severity)[:top], 1))

    def advice_dicts(self, severity: Severity | None = None) -> list[dict[str, Any]]:
        return [dict(rank=i, **r.to_dict()) for i, r in enumerate(self.advice_for(severity), 1)]


WORTSMAN = (
    "Wortsman et al. 2023, Small-scale proxies for large-scale Transformer training instabilities, arXiv 2309.14322"
)
DEHGHANI = "Dehghani et al. 2023, Scaling Vision Transformers to 22B parameters, arXiv 2302.05442"
ZHAI = "Zhai et al. 2023, Stabilizing Transformer Training by Preventing Attention Entropy Collapse, arXiv 2303.06296"
PRIETO = "Prieto et al. 2025, Grokking at the Edge of Numerical Stability, arXiv 2501.04697"
COHEN = (
    "Cohen et al. 2021, Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability, arXiv 2103.00065"
)
COHEN_ADAPTIVE = "Cohen et al. 2022, Adaptive Gradient Methods at the Edge of Stability, arXiv 2207.14484"
PALM = "Chowdhery et al. 2022, PaLM, arXiv 2204.02311"
KIMI = "Kimi Team 2025, Kimi K2 (MuonClip / QK-clip), arXiv 2507.20534; Megatron-LM qk_clip.py"
MICIKEVICIUS = "Micikevicius et al. 2018, Mixed Precision Training, arXiv 1710.03740"
RAZIN = "Razin et al. 2025, Unintentional Unalignment: Likelihood Displacement in DPO, ICLR, arXiv 2410.08847"
DAPO = "Yu et al. 2025, DAPO: An Open-Source LLM Reinforcement Learning System at Scale, arXiv 2503.14476"
COSTE = "Coste et al. 2024, Reward Model Ensembles Help Mitigate Overoptimization, ICLR, arXiv 2310.02743"
TRL_KL = "huggingface/trl#3015 (k3 overflow); verl kl_penalty_forward (log-ratio clamp ±20, k3 clamp ±10)"
ROSENBERG = (
    "Rosenberg & Risteski 2023, Outliers with Opposing Signals Have an Outsized Effect on Neural Network "
    "Optimization, ICLR 2024, arXiv 2311.04163"
)
TRL_TRUNCATION = "huggingface/trl#5697, #6263 (97–99 % truncated at max_completion_length=256)"
DE_LANGE = (
    "De Lange, van de Ven, Tuytelaars 2023, Continual evaluation for lifelong learning: identifying the stability gap, "
    "ICLR, arXiv 2205.13452"
)
CHAUDHRY = "Chaudhry et al. 2019, On Tiny Episodic Memories in Continual Learning, arXiv 1902.10486"
IBRAHIM = (
    "Ibrahim et al. 2024, Simple and Scalable Strategies to Continually Pre-train Large Language Models, "
    "arXiv 2403.08763"
)
GUPTA_REWARM = (
    "Gupta et al. 2023, Continual Pre-Training of Large Language Models: How to (re)warm your model?, arXiv 2308.04014"
)
LORA = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv 2106.09685"
ALLORA = "Huang et al. 2024, ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws, arXiv 2410.09692"
RSLORA = "Kalajdzievski 2023, A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA (rsLoRA), arXiv 2312.03732"
MUD_HOG = (
    "Gupta et al. 2022, Long-Short History of Gradients is All You Need: Detecting Malicious and Unreliable Clients in "
    "Federated Learning (MUD-HoG), ESORICS"
)
ST_MOE = "Zoph et al. 2022, ST-MoE: Designing Stable and Transferable Sparse Expert Models, arXiv 2202.08906"
SWITCH = "Fedus et al. 2021, Switch Transformers, arXiv 2101.03961"
AUX_FREE = "Wang et al. 2024, Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts, arXiv 2408.15664"
KEMPNER_Z = "KempnerInstitute/KempnerForge#117 (router z 2–3 with z-loss 1e-3, 14→24 without)"
HF_AUX_OFF = "huggingface/transformers#44242 (aux loss off unless output_router_logits=True)"
OFQ = "Liu et al. 2023, Oscillation-free Quantization for Low-bit Vision Transformers (OFQ), ICML, arXiv 2302.02210"
NAGEL = "Nagel et al. 2022, Overcoming Oscillations in Quantization-Aware Training, ICML, arXiv 2203.11086"

# A spike detector's warning is a sustained rise (`keel.detect.spike`): its own advice, not the critical's "skip".
SUSTAINED_RISE = (
    Advice(action="lower the learning rate or lengthen warm-up", source=WORTSMAN),
    Advice(action="check attention and output logits; add QK-norm and z-loss", source=f"{DEHGHANI}; {PALM}"),
    Advice(action="roll back past the window and continue (policy='recover')", source=PALM),
)

CAUSES: dict[str, Cause] = {
    c.kind: c
    for c in (
        Cause(
            kind="attention_logit_growth",
            title="attention-logit growth",
            mechanism="The query·key logits grow without bound (the q/k weights grow), attention turns one-hot and "
            "the loss stalls or diverges.",
            advice=(
                Advice(
                    action="add QK-norm (LayerNorm/RMSNorm on queries and keys)",
                    how="keel.nn QK-norm",
                    source=f"{DEHGHANI}; {WORTSMAN}",
                ),
                Advice(action="lower the peak learning rate", source=WORTSMAN),
                Advice(action="lengthen the learning-rate warm-up", source=WORTSMAN),
                Advice(
                    action="cap the logits with QK-clip (rescale W_q, W_k when the max logit exceeds τ≈100)",
                    source=KIMI,
                ),
                Advice(action="reparameterise the attention weights with σReparam", source=ZHAI),
            ),
        ),
        Cause(
            kind="attention_entropy_collapse",
            title="attention-entropy collapse",
            mechanism="The attention distributions collapse to near one-hot: gradients through attention vanish and "
            "training oscillates or stalls.",
            advice=(
                Advice(action="reparameterise linear layers with σReparam", how="keel.nn σReparam", source=ZHAI),
                Advice(action="add QK-norm", source=f"{DEHGHANI}; {WORTSMAN}"),
                Advice(action="lower the learning rate or lengthen warm-up", source=f"{ZHAI}; {WORTSMAN}"),
            ),
        ),
        Cause(
            kind="output_logit_drift",
            title="output-logit divergence",
            mechanism="The output logits drift: log Z moves far from 0 and the logit scale grows, until rounding of "
            "large logits in the working precision corrupts the loss.",
            advice=(
                Advice(action="add a z-loss of 1e-4·(log Z)²", how="keel.losses z-loss", source=f"{PALM}; {WORTSMAN}"),
                Advice(action="use (independent) weight decay on the output layer", source=WORTSMAN),
                Advice(action="compute the logits and the loss in float32", source=MICIKEVICIUS),
                Advice(action="lower the learning rate", source=WORTSMAN),
            ),
        ),
        Cause(
            kind="softmax_collapse",
            title="softmax collapse",
            mechanism="Rows of the output softmax are exactly one-hot in the working precision (Σ exp(z − max) == 1): "
            "their loss and gradient are exactly 0, and the weights only grow along the naïve "
            "loss-minimisation direction.",
            advice=(
                Advice(
                    action="replace softmax cross-entropy with StableMax", how="keel.losses StableMax", source=PRIETO
                ),
                Advice(action="compute the softmax/loss in float64", source=PRIETO),
                Advice(
                    action="project out the weight direction from the gradient (⊥Grad / ⊥AdamW)",
                    how="keel.optim OrthoGrad",
                    source=PRIETO,
                ),
                Advice(action="add weight decay", source=PRIETO),
            ),
        ),
        Cause(
            kind="edge_of_stability",
            title="learning rate beyond the edge of stability",
            mechanism="The learning rate times the sharpness exceeds the stability threshold (η·λ_max > 2 for GD; "
            "the preconditioned analogue for Adam): the top curvature direction is amplified each step.",
            advice=(
                Advice(action="lower the learning rate (or undo the LR jump)", source=COHEN),
                Advice(action="lengthen warm-up so sharpness can adapt", source=f"{COHEN}; {WORTSMAN}"),
                Advice(action="clip gradients / use a spike-aware optimizer", source=COHEN_ADAPTIVE),
            ),
        ),
        Cause(
            kind="opposing_signals",
            title="outliers with opposing signals",
            mechanism="Two groups of examples carry a strong shared feature whose gradients point in opposite "
            "directions; training balances them in a sharp valley, their losses oscillate in antiphase and the loss "
            "spikes.",
            advice=(
                Advice(
                    action="inspect the two groups (the probe set's top risers and fallers) for the feature they share",
                    how="keel.signals.opposing_groups",
                    source=ROSENBERG,
                ),
                Advice(
                    action="lower the learning rate (or add warm-up) so the sharp direction stays stable",
                    source=f"{ROSENBERG}; {COHEN}",
                ),
                Advice(action="clip gradients / use a spike-aware optimizer", source=COHEN_ADAPTIVE),
            ),
        ),
        Cause(
            kind="eps_dominance",
            title="Adam ε dominates the update",
            mechanism="The gradient's RMS is at or below Adam's ε, so ε sets the denominator and the update silently "
            "shrinks.",
            advice=(
                Advice(action="lower Adam's ε (e.g. 1e-15)", source=WORTSMAN),
                Advice(action="check the loss scale and gradient clipping", source=MICIKEVICIUS),
            ),
        ),
        Cause(
            kind="loss_scale_thrash",
            title="loss-scale thrash",
            mechanism="The GradScaler keeps backing off: the scaled gradients overflow far more often than once per "
            "growth interval, or at every scale tried, so the scale sinks toward its minimum, steps are skipped and "
            "small fp16 gradients underflow.",
            advice=(
                Advice(
                    action="find what overflows at any scale (a NaN or Inf born in the forward pass, a value beyond "
                    "fp16's 65504)",
                    how="keel.detect.NonFiniteOriginDetector; keel.signals.NumericsProbe",
                    source="NVIDIA/apex#834",
                ),
                Advice(action="use bf16 instead of fp16, or keep the overflowing op in float32", source=MICIKEVICIUS),
                Advice(
                    action="lower the learning rate or normalise what grows (targets, activations)",
                    source="deepspeedai/DeepSpeed#931; NVIDIA/apex#864",
                ),
            ),
        ),
        Cause(
            kind="activation_growth",
            title="activation growth towards overflow",
            mechanism="Block outputs grow towards the largest value of the working precision (65504 in fp16); the "
            "next step overflows to Inf and NaN.",
            advice=(
                Advice(action="use bf16 instead of fp16, or keep norms and residuals in float32", source=MICIKEVICIUS),
                # loss scaling scales the gradients, not the forward's activations: no advice here; weight decay 0.1
                # did not stop the zoo's fp16 overflow, LR 0.1 → 0.01 did (docs/low_precision.md)
                Advice(action="lower the learning rate", source=WORTSMAN),
            ),
        ),
        Cause(
            kind="non_finite",
            title="non-finite values",
            mechanism="NaN or Inf reached the loss, the gradients or the weights.",
            advice=(
                Advice(
                    # non-finite weights are not mended by a skip: the summary after such a rollback said "skip"
                    action="skip the update when the gradients are non-finite (policy='skip'), roll back to the last "
                    "finite snapshot when the weights are (policy='recover'), and find the module where it was born",
                    source="metaseq nan_detector.py; Megatron-LM rerun_state_machine.py",
                ),
                Advice(action="prefer bf16 to fp16, or use dynamic loss scaling", source=MICIKEVICIUS),
                Advice(action="lower the learning rate", source=PALM),
            ),
        ),
        Cause(
            kind="loss_spike",
            title="loss spike",
            mechanism="One update made the loss jump: an extreme batch or an overshooting step.",
            advice=(
                Advice(
                    action="skip the update (policy='skip')", source="OLMo-core SkipStepOptimizer; metaseq skip_spike"
                ),
                Advice(action="inspect and drop the batches at the spike", source=PALM),
                Advice(action="roll back ~100 steps and skip the data window (policy='recover')", source=PALM),
            ),
            # a warning: the loss stayed high for several steps (the model or the data changed), nothing was skipped
            warning_advice=SUSTAINED_RISE,
        ),
        Cause(
            kind="grad_spike",
            title="gradient spike",
            mechanism="The gradient norm jumped far above its recent level.",
            advice=(
                Advice(
                    action="skip the update or clip the gradient norm",
                    source="OLMo-core SkipStepOptimizer; Huang et al. 2025, Stable-SPAM, arXiv 2502.17055",
                ),
                Advice(action="lower the learning rate", source=PALM),
            ),
            warning_advice=(
                Advice(action="lower the learning rate or lengthen warm-up", source=WORTSMAN),
                Advice(
                    action="clip the gradient norm, or clip spike-aware (Stable-SPAM AdaClip)",
                    source="Huang et al. 2025, Stable-SPAM, arXiv 2502.17055",
                ),
                *SUSTAINED_RISE[1:],
            ),
        ),
        Cause(
            kind="norm_stats_jump",
            title="normalization statistics poisoned by one batch",
            mechanism="A BatchNorm layer in train mode normalizes with each batch's own statistics, so a finite batch "
            "far outside the data's scale leaves the loss and the gradient norm looking normal, but its variance is "
            "folded into the layer's running statistics, and every eval-mode forward after it normalizes with them "
            "until the moving average forgets the batch (at momentum 0.1, ~20 steps per factor of 10).",
            advice=(
                Advice(
                    action="skip the update (policy='skip' or 'recover'): the update and the batch's statistics are "
                    "left out",
                    source="a CIFAR-style ResNet with one batch of pixels x1e4 (keel h27 B)",
                ),
                Advice(
                    action="check the data pipeline: a batch far outside the data's scale (a missing /255 or "
                    "normalization, a corrupt file, a wrong dtype cast)",
                    source="torch.nn.BatchNorm2d (running statistics updated in the train-mode forward)",
                ),
            ),
            warning_advice=(
                Advice(
                    action="check the data pipeline at this step: a batch well outside the data's scale",
                    source="torch.nn.BatchNorm2d (running statistics updated in the train-mode forward)",
                ),
            ),
        ),
        Cause(
            kind="lr_surge",
            title="learning-rate surge",
            mechanism="The learning rate of this update is far above any the run had used: a schedule or LR formula "
            "that returns a wrong value for a step moves the weights tens of times as far as the updates around it, "
            "and the loss jumps or stays raised for many steps after.",
            advice=(
                Advice(
                    action="skip the update (policy='skip' or 'recover'): it is left out before it is applied",
                    source="nanochat/minGPT/litgpt loops with one update at 100x the learning rate (keel h26 F4)",
                ),
                Advice(
                    action="check the schedule or LR formula at this step (a warm-up or decay factor, a resumed "
                    "scheduler's state, a group's LR written by hand)",
                    source="torch.optim.lr_scheduler",
                ),
            ),
            warning_advice=(
                Advice(
                    action="if the raised learning rate is meant, nothing to do; else check the schedule or LR formula",
                    source="torch.optim.lr_scheduler",
                ),
            ),
        ),
        Cause(
            kind="divergence",
            title="divergence",
            mechanism="The loss rose well above its best level and stays there.",
            advice=(
                Advice(action="roll back before the onset and continue with a lower learning rate", source=PALM),
                Advice(action="check attention and output logits; add QK-norm and z-loss", source=WORTSMAN),
            ),
        ),
        Cause(
            kind="likelihood_displacement",
            title="likelihood displacement",
            mechanism="The preference loss widens the chosen–rejected margin by pushing both log-probabilities down, "
            "moving probability mass from the preferred response to others; pairs whose responses are similar "
            "(high CHES) displace the most.",
            advice=(
                Advice(
                    action="anchor the chosen response with an NLL (SFT) term",
                    how="TRL loss_type=['sigmoid', 'sft']; keel.losses.chosen_sft_loss beside keel.losses.dpo_loss",
                    source=RAZIN,
                ),
                Advice(
                    action="drop the pairs with the highest CHES score before training",
                    how="keel.data.filter_preference_pairs",
                    source=RAZIN,
                ),
                Advice(action="lower the learning rate", source=RAZIN),
            ),
        ),
        Cause(
            kind="policy_entropy_collapse",
            title="policy-entropy collapse",
            mechanism="The policy concentrates on a few tokens: the clipped surrogate lets likely tokens grow faster "
            "than unlikely ones can, exploration stops and the reward stalls.",
            advice=(
                Advice(
                    action="decouple the clip range and raise its upper side (clip-higher, ε_high = 0.28)",
                    how="keel.losses.clipped_policy_loss(epsilon_high=0.28); TRL epsilon_high=0.28",
                    source=DAPO,
                ),
                Advice(action="lower the learning rate", source=DAPO),
                Advice(
                    action="add an entropy bonus, or an adaptive one with a target entropy",
                    source="huggingface/trl#6140 (use_adaptive_entropy)",
                ),
            ),
        ),
        Cause(
            kind="kl_blowup",
            title="KL blow-up",
            mechanism="The policy drifts far from the reference on some tokens; the k3 estimator exp(ref − logp) "
            "grows exponentially in the log-ratio and overflows to Inf, and the KL penalty's gradient with it.",
            advice=(
                Advice(
                    action="clamp the log-ratio to ±20 before the exponential (and the k3 term to ±10)",
                    how="keel.losses.k3_kl with its verl clamps",
                    source=TRL_KL,
                ),
                Advice(action="skip the step whose KL or loss is non-finite (policy='skip')", source=TRL_KL),
                Advice(action="lower the learning rate, or raise the KL coefficient β", source=COSTE),
            ),
        ),
        Cause(
            kind="reward_overoptimization",
            title="reward over-optimisation",
            mechanism="The policy exploits the proxy reward model where it is wrong: the proxy score keeps rising "
            "while the true objective falls, and reward models that differ only in seed do not confirm the gain "
            "(the proxy's lead over their mean grows).",
            advice=(
                Advice(
                    action="optimise a conservative ensemble reward: worst-case (WCO) or uncertainty-weighted (UWO)",
                    how="keel.losses.ensemble_reward(rewards, objective='wco' | 'uwo')",
                    source=COSTE,
                ),
                Advice(action="strengthen the KL penalty to the reference policy", source=COSTE),
                Advice(action="stop at, or roll back to, the step before the alarm", source=COSTE),
            ),
        ),
        Cause(
            kind="length_explosion",
            title="length explosion",
            mechanism="Responses grow toward the generation limit; truncated ones carry no end-of-sequence reward "
            "and dominate a token-level loss, so the reward turns to noise.",
            advice=(
                Advice(
                    action="shape the reward of overlong responses with a soft penalty in the last L_cache tokens",
                    how="keel.losses.soft_overlong_punishment; trl.rewards.get_soft_overlong_punishment",
                    source=DAPO,
                ),
                Advice(
                    action="mask truncated responses out of the loss (overlong filtering)",
                    how="TRL mask_truncated_completions=True",
                    source=DAPO,
                ),
                Advice(action="raise max_completion_length if the task needs longer answers", source=TRL_TRUNCATION),
            ),
        ),
        Cause(
            kind="clip_saturation",
            title="clip saturation",
            mechanism="Most tokens' probability ratio is outside the clip range: the policy moved too far from the "
            "one that sampled the batch, and the few unclipped tokens carry biased updates.",
            advice=(
                Advice(
                    action="widen the upper clip side if the high side saturates (clip-higher, ε_high = 0.28)",
                    how="keel.losses.clipped_policy_loss(epsilon_high=0.28)",
                    source=DAPO,
                ),
                Advice(
                    action="lower the learning rate or the number of passes per batch (num_iterations)", source=DAPO
                ),
                Advice(
                    action="watch grad norm and clip share together",
                    source="huggingface/trl#2980 (clip ratio and grad norm climbing after ~10k steps)",
                ),
            ),
        ),
        Cause(
            kind="dead_groups",
            title="dead groups",
            mechanism="Nearly every prompt group got equal rewards for all its responses, so every advantage is "
            "zero and the batch carries no gradient.",
            advice=(
                Advice(
                    action="resample groups whose rewards are all equal (dynamic sampling)",
                    how="keel.losses.informative_groups",
                    source=DAPO,
                ),
                Advice(
                    action="adjust the prompt difficulty or the reward so groups disagree",
                    source="huggingface/trl#3857 (reward_std 0, loss 0, grad_norm 0)",
                ),
            ),
        ),
        Cause(
            kind="source_drift",
            title="source drift",
            mechanism="One data source's loss or gradients moved away from the other sources' while theirs did not: "
            "its data changed (corrupted or flipped labels, a broken preprocessing step, a new shard), not the model.",
            advice=(
                Advice(
                    action="inspect the named source's recent data: labels, preprocessing, the shard it reads",
                    source=MUD_HOG,
                ),
                Advice(
                    action="drop or down-weight the source until it is fixed; skip-list the examples it contributed",
                    how="keel.SkipListSampler with run_dir/skip_list.json",
                    source=MUD_HOG,
                ),
            ),
        ),
        Cause(
            kind="truncation_starvation",
            title="truncation starvation",
            mechanism="Nearly every response is cut at the generation limit, so every one gets the same (lowest) "
            "reward: the groups are uniform and no gradient flows.",
            advice=(
                Advice(action="raise max_completion_length to what the task needs", source=TRL_TRUNCATION),
                Advice(
                    action="shape overlong rewards softly instead of a flat failure",
                    how="keel.losses.soft_overlong_punishment",
                    source=DAPO,
                ),
                Advice(
                    action="resample uniform groups (dynamic sampling)",
                    how="keel.losses.informative_groups",
                    source=DAPO,
                ),
            ),
        ),
        Cause(
            kind="lora_blowup",
            title="LoRA adapter blow-up",
            mechanism="A LoRA adapter's update ΔW = scaling·B·A grows by several per cent of its base weight per "
            "step: B leaves zero too fast for the LR and scaling, the adapter soon outweighs the weight it adapts, "
            "and the loss climbs.",
            advice=(
                Advice(
                    action="lower the learning rate (LoRA's is often 5-10× the full fine-tune's, not more)",
                    how="keel.Guard(..., policy='recover') backs the LR off after a rollback",
                    source=LORA,
                ),
                Advice(
                    action="scale each adapter's update inversely to its norm (ALLoRA): B leaves zero fast, then slows",
                    how="keel.optim.ALLoRA.for_peft(model).attach(optimizer), with keel.optim.apply_allora(model)",
                    source=ALLORA,
                ),
                Advice(
                    action="set the scaling for the rank: α/√r (rsLoRA, peft LoraConfig(use_rslora=True)) or a "
                    "smaller α, not a large α tuned at another rank",
                    source=RSLORA,
                ),
                Advice(
                    action="clip the gradient norm",
                    how="keel.Guard(..., max_grad_norm=1.0)",
                    source=PALM,
                ),
            ),
        ),
        Cause(
            kind="qat_oscillation",
            title="QAT weight oscillation",
            mechanism="In quantization-aware training the straight-through estimator lets latent weights next to a "
            "rounding boundary cross it back and forth: their integer codes flip every few steps, the quantized "
            "network never settles, the statistics downstream keep moving and the final quantized weights are a "
            "random side of each boundary.",
            advice=(
                Advice(
                    action="anneal with confident-weight freezing (CGA): in the last phase train only the weights "
                    "near a rounding boundary",
                    how="keel.optim.ConfidenceGuidedAnnealing.for_model(model).attach(optimizer)",
                    source=OFQ,
                ),
                Advice(action="lower the learning rate, or cool it down to a small value", source=NAGEL),
                Advice(
                    action="use a statistical scale instead of a learned one (StatsQ)",
                    how="keel.nn.fake_quantize(model, 'statsq', bits=...)",
                    source=OFQ,
                ),
                Advice(action="freeze the weights whose oscillation frequency stays high", source=NAGEL),
            ),
        ),
        Cause(
            kind="stability_gap",
            title="stability gap",
            mechanism="Right after a switch of task or data mix, the first updates on the new data pull the shared "
            "weights towards it before the model has found a solution that serves both: the earlier task's eval "
            "collapses, then mostly recovers (a transient forgetting that end-of-task evaluation never shows).",
            advice=(
                Advice(
                    action="replay a share of the earlier tasks' data after the switch (experience replay)",
                    how="keel.data.PowerLawReplay",
                    source=f"{DE_LANGE}; {CHAUDHRY}",
                ),
                Advice(
                    action="lower the learning rate at the switch: re-warm to a smaller peak, or keep it low",
                    source=f"{IBRAHIM}; {GUPTA_REWARM}",
                ),
                Advice(
                    action="warm the learning rate up again after the switch, from a small value, with replay",
                    source=f"{GUPTA_REWARM}; {IBRAHIM}",
                ),
            ),
        ),
        Cause(
            kind="router_logit_growth",
            title="router-logit growth",
            mechanism="The router's logits keep growing (its weights grow along the directions that pick experts): "
            "the routing softmax saturates, the router's gradient vanishes and its choices freeze, and in low "
            "precision the exponentials of large logits round badly, so routing flips noisily and the loss spikes.",
            advice=(
                Advice(
                    action="add the router z-loss, 1e-3·mean(logsumexp(router logits))²",
                    how='keel.stabilize(model, ["router_z_loss"])',
                    source=ST_MOE,
                ),
                Advice(
                    action="compute the router (logits, softmax) in float32",
                    source=f"{ST_MOE}; Megatron-LM moe_router_dtype",
                ),
                Advice(action="lower the learning rate or lengthen the warm-up", source=f"{ST_MOE}; {WORTSMAN}"),
                Advice(action="clip the gradient norm", how="keel.Guard(..., max_grad_norm=1.0)", source=ST_MOE),
            ),
        ),
        Cause(
            kind="load_collapse",
            title="MoE load collapse",
            mechanism="The router sends most tokens to a few experts: those train faster and are picked more (a "
            "rich-get-richer loop) while the others starve, so the layer's capacity shrinks towards a dense "
            "layer's, and under a capacity limit the overflow tokens are dropped.",
            advice=(
                Advice(
                    action="add the load-balancing loss, 1e-2·E·Σ f_i·P_i (in Hugging Face models it is off unless "
                    "output_router_logits=True)",
                    how='keel.stabilize(model, ["load_balancing"])',
                    source=f"{SWITCH}; {HF_AUX_OFF}",
                ),
                Advice(
                    action="balance without an auxiliary loss: a per-expert bias on the selection scores, "
                    "bias += 1e-3·sign(mean load − load) each step",
                    source=AUX_FREE,
                ),
                Advice(
                    action="add the router z-loss (1e-3) so the router stays soft enough to rebalance",
                    how='keel.stabilize(model, ["router_z_loss"])',
                    source=f"{ST_MOE}; {KEMPNER_Z}",
                ),
                Advice(action="lower the learning rate; keep the router in float32", source=ST_MOE),
            ),
        ),
        Cause(
            kind="dead_experts",
            title="dead experts",
            mechanism="Some experts get no tokens at all, step after step: with no tokens they get no gradient, "
            "and the router, which never picks them, has no reason to start; their parameters are wasted.",
            advice=(
                Advice(
                    action="balance with a per-expert selection bias (bias += 1e-3·sign(mean load − load)): it "
                    "raises an unpicked expert's score until it is picked",
                    source=AUX_FREE,
                ),
                Advice(
                    action="add or raise the load-balancing loss (1e-2; check it is really on in Hugging Face models)",
                    how='keel.stabilize(model, ["load_balancing"])',
                    source=f"{SWITCH}; {HF_AUX_OFF}",
                ),
                Advice(
                    action="add the router z-loss (1e-3); lower the learning rate",
                    how='keel.stabilize(model, ["router_z_loss"])',
                    source=ST_MOE,
                ),
            ),
        ),
    )
}


def cause_for(kind: str) -> Cause | None:
    """The catalogue entry of a finding kind, or None."""
    return CAUSES.get(kind)
