"""The rows of `keel bench detect --probe-costs` that time a component outside the probes: the stabilizers of
`keel.nn`, the minmax int4 fake quantization, keel's losses that change a step (StableMax cross-entropy, teacher
intervention), ALLoRA's gradient transform, `Guard`'s own one-word options (``max_grad_norm``, ``sync``,
``log_every``), the ``update_ratio`` probe, which measures on the Guard's log steps, `Guard` given a
``GradScaler`` under fp16 autocast (on the CPU: the scaler's path runs there too), and ``scale_long`` on a byte-level
U-ViT (`keel.harness.bench._uvit`: the proxy has no long skips).

Each row names the loops it is measured against: ``bare`` (its ratio's denominator) and ``foundation`` (its
``extra_ms_vs_foundation``). A component used without a `Guard` (a stabilizer, a loss, a quantizer, ALLoRA) runs
in a bare loop and is measured against the bare loop of the same model without it, so its ratio and its extra ms
are the component's own cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the --group names of `keel bench detect --probe-costs`, in the order the rows print
GROUPS = ("probes", "guard", "moe", "qat", "stabilizers", "losses", "lora", "amp", "unet")

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True, kw_only=True)
class CostRow:
    """One row: its group, and the loops its ratio (``bare``) and its extra ms (``foundation``) are taken against."""

    group: str
    bare: str
    foundation: str


# the opt-in probes timed one by one, each measuring every step on top of the foundation's probes
OPT_IN_PROBES = (
    "attn_logits",
    "attn_entropy",
    "output_logits",
    "activation_rms",
    "grad_weight_cos",
    "adam_eps",
    "numerics",
)

# name → row, for every row of the bench (the probe rows' baselines as they were before these rows existed)
ROWS: dict[str, CostRow] = {
    "bare": CostRow(group="probes", bare="bare", foundation="foundation"),
    "foundation": CostRow(group="probes", bare="bare", foundation="foundation"),
    **{
        probe: CostRow(group="probes", bare="bare", foundation="foundation")
        for probe in (*OPT_IN_PROBES, "transformer", "router (no MoE)")
    },
    # update_ratio measures on the Guard's log steps (log_every, default 50): timed at log_every=1 against the
    # foundation at log_every=1, whose per-parameter norms then run every step too
    "guard log_every=1": CostRow(group="guard", bare="bare", foundation="foundation"),
    "update_ratio": CostRow(group="guard", bare="bare", foundation="guard log_every=1"),
    "guard max_grad_norm=1": CostRow(group="guard", bare="bare", foundation="foundation"),
    "guard sync=deferred": CostRow(group="guard", bare="bare", foundation="foundation"),
    "moe bare": CostRow(group="moe", bare="moe bare", foundation="moe foundation"),
    "moe foundation": CostRow(group="moe", bare="moe bare", foundation="moe foundation"),
    "router": CostRow(group="moe", bare="moe bare", foundation="moe foundation"),
    **{
        f"stabilizer {name}": CostRow(group="moe", bare="moe bare", foundation="moe bare")
        for name in (
            "router_z_loss",
            "load_balancing",
            "dense_to_sparse (dense phase)",
            "dense_to_sparse (hard phase)",
            "momentum_smoe",
        )
    },
    "qat bare": CostRow(group="qat", bare="bare", foundation="qat bare"),
    "qat foundation": CostRow(group="qat", bare="qat bare", foundation="qat foundation"),
    "weight_oscillation": CostRow(group="qat", bare="qat bare", foundation="qat foundation"),
    "cga": CostRow(group="qat", bare="qat bare", foundation="qat foundation"),
    "quantizer minmax int4": CostRow(group="qat", bare="bare", foundation="bare"),
    "loss teacher_intervention": CostRow(group="qat", bare="qat bare", foundation="qat bare"),
    **{
        f"stabilizer {name}": CostRow(group="stabilizers", bare="bare", foundation="bare")
        for name in ("qk_norm", "z_loss", "sigma_reparam")
    },
    "stabilize() (qk_norm + z_loss)": CostRow(group="stabilizers", bare="bare", foundation="bare"),
    "loss stablemax_cross_entropy": CostRow(group="losses", bare="bare", foundation="bare"),
    "lora bare": CostRow(group="lora", bare="lora bare", foundation="lora bare"),
    "optim ALLoRA": CostRow(group="lora", bare="lora bare", foundation="lora bare"),
    # fp16 autocast on the CPU with a torch.amp.GradScaler("cpu"): the bare loop scales, steps and updates it itself;
    # under a Guard given the scaler, Guard.step unscales, reads the scale and the overflow flags, steps and updates
    "fp16 bare": CostRow(group="amp", bare="bare", foundation="fp16 bare"),
    "guard scaler (fp16)": CostRow(group="amp", bare="fp16 bare", foundation="fp16 bare"),
    # scale_long needs a U-Net's long skips: a byte-level U-ViT (keel.harness.bench._uvit), with and without it
    "unet bare": CostRow(group="unet", bare="unet bare", foundation="unet bare"),
    "stabilizer scale_long": CostRow(group="unet", bare="unet bare", foundation="unet bare"),
    "stabilizer scale_long (calibrated)": CostRow(group="unet", bare="unet bare", foundation="unet bare"),
}


def selected_rows(groups: tuple[str, ...] | None) -> list[str]:
    """The rows of ``groups`` (all when None) and every loop they are measured against, in table order."""
    unknown = [g for g in groups or () if g not in GROUPS]
    if unknown:
        raise ValueError(f"probe costs: unknown group(s) {unknown}; allowed: {', '.join(GROUPS)}")
    wanted = {name for name, row in ROWS.items() if groups is None or row.group in groups}
    while missing := {b for n in wanted for b in (ROWS[n].bare, ROWS[n].foundation)} - wanted:
        wanted |= missing  # and a baseline's own baselines (qat foundation → qat bare → bare → foundation)
    return [name for name in ROWS if name in wanted]


def component_loop(
    name: str, size: str, base_probes: list[str]
) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any] | None, LossFn | None, torch.amp.GradScaler | None]:
    """The model, optimizer, `Guard` arguments (None: a bare loop), loss (None: cross-entropy) and loss scaler (None:
    none) of one of the rows this module adds."""
    torch.manual_seed(0)
    if name in ("fp16 bare", "guard scaler (fp16)"):
        return _fp16(size, base_probes if name.startswith("guard") else None)
    if ROWS.get(name, CostRow(group="", bare="", foundation="")).group == "unet":
        return (*_uvit(name), None)
    return (*_component_loop(name, size, base_probes), None)


def _component_loop(
    name: str, size: str, base_probes: list[str]
) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any] | None, LossFn | None]:
    from keel.nn import create_stabilizer, fake_quantize, stabilize
    from keel.nn.stabilizers import Stabilizer
    from keel.proxy import MoeConfig, create_proxy_model

    if name.startswith("guard "):
        model = create_proxy_model(size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        options: dict[str, dict[str, Any]] = {
            "guard max_grad_norm=1": {"max_grad_norm": 1.0},
            "guard sync=deferred": {"sync": "deferred"},
            "guard log_every=1": {"log_every": 1},
        }
        option = options[name]
        return model, opt, {"probes": base_probes, **option}, None
    if name == "update_ratio":
        model = create_proxy_model(size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt, {"probes": [*base_probes, "update_ratio"], "log_every": 1}, None
    if name.startswith("stabilizer ") or name.startswith("stabilize()"):
        stabilizer = name.removeprefix("stabilizer ")
        moe = ROWS[name].group == "moe"
        model = create_proxy_model(size, **({"moe": MoeConfig()} if moe else {}))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        names: tuple[str | Stabilizer, ...] = ("qk_norm", "z_loss") if name.startswith("stabilize()") else (stabilizer,)
        if stabilizer.startswith("dense_to_sparse"):  # dense (every expert runs) until hard_step, then top-1
            names = (create_stabilizer("dense_to_sparse", hard_step=0 if "hard" in stabilizer else 10**9),)
        result = stabilize(model, names, optimizer=opt)
        if "z_loss" not in names:
            return model, opt, None, None
        return model, opt, None, lambda x, y: _cross_entropy(model, x, y) + result.z_loss()
    if name == "quantizer minmax int4":
        quantized = fake_quantize(create_proxy_model(size), "minmax")  # Stable-SPAM's INT4 grid, groups of 256
        return quantized, torch.optim.AdamW(quantized.parameters(), lr=1e-3), None, None
    if name == "loss teacher_intervention":
        return _teacher_intervention(size)
    if name == "loss stablemax_cross_entropy":
        from keel.losses import stablemax_cross_entropy

        model = create_proxy_model(size)
        return (
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-3),
            None,
            lambda x, y: stablemax_cross_entropy(model(x).flatten(0, 1), y.flatten()),
        )
    if name in ("lora bare", "optim ALLoRA"):
        return _lora(size, allora=name == "optim ALLoRA")
    raise ValueError(f"probe costs: no component row {name!r}; allowed: {', '.join(ROWS)}")


def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _teacher_intervention(size: str) -> tuple[nn.Module, torch.optim.Optimizer, None, LossFn]:
    """The 3-bit StatsQ QAT proxy (the ``qat bare`` model) trained on cross-entropy plus
    `teacher_intervention_loss` against a frozen full-precision copy of itself: the teacher's forward (no grad) and
    each student block's extra forward and backward on the teacher's states are the row's cost."""
    from keel.losses import teacher_intervention_loss
    from keel.nn import fake_quantize
    from keel.proxy import ProxyGPT, create_proxy_model

    torch.manual_seed(0)
    teacher = create_proxy_model(size).requires_grad_(False)
    torch.manual_seed(0)  # the student starts as the teacher, as a QAT fine-tune does
    student = create_proxy_model(size)
    fake_quantize(student, "statsq", bits=3)  # in place

    def teacher_states(model: ProxyGPT, x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            h = model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1], device=x.device))
            states = [h]
            for block in model.blocks:
                h = block(h)
                states.append(h)
        return states

    def loss(x: Tensor, y: Tensor) -> Tensor:
        states = teacher_states(teacher, x)  # type: ignore[arg-type]
        return _cross_entropy(student, x, y) + teacher_intervention_loss(list(student.blocks), states)

    return student, torch.optim.AdamW(student.parameters(), lr=1e-3), None, loss


def _lora(size: str, *, allora: bool) -> tuple[nn.Module, torch.optim.Optimizer, None, None]:
    """peft LoRA (r 8) on every block linear of the proxy, in ALLoRA's layout (α = r, no dropout), AdamW over the
    adapters; with ``allora`` the ALLoRA gradient transform runs before each ``optimizer.step()``."""
    import peft  # noqa: PLC0415  (optional: keel[test])

    from keel.optim import ALLoRA
    from keel.proxy import create_proxy_model

    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv", "proj", "fc"], lora_dropout=0.0)
    model = peft.get_peft_model(create_proxy_model(size), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if allora:
        ALLoRA.for_peft(model).attach(opt)
    return model, opt, None, None


def _fp16(
    size: str, guard_probes: list[str] | None
) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any] | None, LossFn, torch.amp.GradScaler]:
    """The proxy's forward under ``torch.autocast("cpu", torch.float16)``, the loss in float32, and a
    ``GradScaler("cpu")``; with ``guard_probes`` a `Guard` with those probes is given the scaler."""
    from keel.proxy import create_proxy_model

    model = create_proxy_model(size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")

    def loss(x: Tensor, y: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    kwargs = None if guard_probes is None else {"probes": guard_probes, "scaler": scaler}
    return model, opt, kwargs, loss, scaler


def _uvit(name: str) -> tuple[nn.Module, torch.optim.Optimizer, None, None]:
    """The byte U-ViT bare, or with ``scale_long`` (κ 0.5, constant; or the calibrated gate over its 64 tokens)."""
    from keel.harness.bench._uvit import ByteUViT
    from keel.nn import create_stabilizer, stabilize

    model = ByteUViT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if name != "unet bare":
        mode = "calibrated" if "calibrated" in name else "constant"
        stabilizer = create_stabilizer("scale_long", mode=mode, **({"tokens": 64} if mode == "calibrated" else {}))
        stabilize(model, (stabilizer,), optimizer=opt)
    return model, opt, None, None
