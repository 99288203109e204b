"""The domain index: every signal probe, detector, stabilizer, optimizer, loss, data utility and integration keel has,
grouped by the domain it serves, each with a one-line summary and its reference (``keel list``).

The summaries come from the components' own docstrings, so they cannot drift from the code; the domain and the
reference of each are declared here once. A test checks this table against the registries both ways: a new probe,
detector, stabilizer or optimizer that is not indexed here fails it, and so does an entry for one that is gone.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from keel._core.registry import Registry
from keel.detect import causes
from keel.detect.detector import DETECTORS
from keel.nn.fake_quant import QUANTIZERS
from keel.nn.stabilizers import stabilizers
from keel.optim._registry import optimizers
from keel.signals.registry import DEFAULT_PROBES, PROBES

# The order `keel list` prints them in.
DOMAINS = (
    "core",
    "transformer",
    "optimizer",
    "preference and RL",
    "data attribution",
    "fine-tuning and continual learning",
    "mixture of experts",
    "low precision",
    "other",  # registered but not indexed yet: shown, never hidden (tests/test_catalog.py wants none)
)
KINDS = ("signal", "detector", "stabilizer", "optimizer", "quantizer", "loss", "data", "integration")

_SOURCE_DRIFT = causes.MUD_HOG
_SPAM = "Huang et al. 2025, SPAM, arXiv 2501.06842"
_STABLE_SPAM = "Huang et al. 2025, Stable-SPAM, arXiv 2502.17055"

# (kind, name) → (domain, reference). Names are registry names (probes, detectors, stabilizers, optimizers) or the
# public attribute of keel.losses / keel.data / keel.integrations that the entry documents.
_INDEX: dict[tuple[str, str], tuple[str, str]] = {
    ("signal", "loss"): ("core", ""),
    ("signal", "grad_norm"): ("core", ""),
    ("signal", "param_norm"): ("core", ""),
    ("signal", "update_ratio"): ("core", causes.WORTSMAN),
    ("signal", "grad_weight_cos"): ("core", ""),
    ("signal", "sharpness"): ("core", causes.COHEN),
    ("signal", "attn_logits"): ("transformer", causes.DEHGHANI),
    ("signal", "attn_entropy"): ("transformer", causes.ZHAI),
    ("signal", "output_logits"): ("transformer", causes.WORTSMAN),
    ("signal", "activation_rms"): ("transformer", causes.WORTSMAN),
    ("signal", "adam_eps"): ("low precision", causes.WORTSMAN),
    ("signal", "numerics"): ("low precision", "Micikevicius et al. 2018, Mixed Precision Training, arXiv 1710.03740"),
    ("signal", "opposing_signals"): ("data attribution", causes.ROSENBERG),
    ("signal", "lora"): ("fine-tuning and continual learning", "Hu et al. 2021, LoRA, arXiv 2106.09685"),
    ("signal", "router"): ("mixture of experts", "Zoph et al. 2022, ST-MoE, arXiv 2202.08906"),
    ("signal", "weight_oscillation"): ("low precision", causes.OFQ),
    ("signal", "norm_stats"): ("core", "Ioffe and Szegedy 2015, Batch Normalization, arXiv 1502.03167"),
    ("detector", "spike"): ("core", causes.PALM),
    ("detector", "divergence"): ("core", causes.WORTSMAN),
    ("detector", "norm_stats_jump"): ("core", "Ioffe and Szegedy 2015, Batch Normalization, arXiv 1502.03167"),
    ("detector", "non_finite"): ("core", causes.MICIKEVICIUS),
    ("detector", "non_finite_origin"): ("core", causes.MICIKEVICIUS),
    ("detector", "edge_of_stability"): ("core", causes.COHEN_ADAPTIVE),
    ("detector", "attention_logit_growth"): ("transformer", causes.DEHGHANI),
    ("detector", "attention_entropy_collapse"): ("transformer", causes.ZHAI),
    ("detector", "output_logit_drift"): ("transformer", causes.WORTSMAN),
    ("detector", "softmax_collapse"): ("transformer", causes.PRIETO),
    ("detector", "likelihood_displacement"): ("preference and RL", causes.RAZIN),
    ("detector", "reward_overoptimization"): ("preference and RL", causes.COSTE),
    ("detector", "kl_blowup"): ("preference and RL", causes.TRL_KL),
    ("detector", "policy_entropy_collapse"): ("preference and RL", causes.DAPO),
    ("detector", "clip_saturation"): ("preference and RL", causes.DAPO),
    ("detector", "dead_groups"): ("preference and RL", causes.DAPO),
    ("detector", "length_explosion"): ("preference and RL", causes.TRL_TRUNCATION),
    ("detector", "lora_blowup"): ("fine-tuning and continual learning", "Hu et al. 2021, LoRA, arXiv 2106.09685"),
    ("detector", "stability_gap"): ("fine-tuning and continual learning", causes.DE_LANGE),
    ("detector", "router_logit_growth"): ("mixture of experts", causes.ST_MOE),
    ("detector", "qat_oscillation"): ("low precision", causes.OFQ),
    ("detector", "activation_growth"): ("low precision", causes.MICIKEVICIUS),
    ("detector", "eps_dominance"): ("low precision", causes.WORTSMAN),
    ("detector", "loss_scale_thrash"): ("low precision", causes.MICIKEVICIUS),
    ("detector", "lr_surge"): ("core", causes.WORTSMAN),
    ("detector", "load_collapse"): ("mixture of experts", causes.SWITCH),
    ("detector", "dead_experts"): ("mixture of experts", causes.AUX_FREE),
    ("detector", "opposing_signals"): ("data attribution", causes.ROSENBERG),
    ("detector", "source_drift"): ("data attribution", _SOURCE_DRIFT),
    ("stabilizer", "qk_norm"): ("transformer", ""),
    ("stabilizer", "sigma_reparam"): ("transformer", ""),
    ("stabilizer", "z_loss"): ("transformer", ""),
    ("stabilizer", "router_z_loss"): ("mixture of experts", ""),
    ("stabilizer", "load_balancing"): ("mixture of experts", ""),
    ("stabilizer", "dense_to_sparse"): ("mixture of experts", ""),
    ("stabilizer", "momentum_smoe"): ("mixture of experts", ""),
    ("stabilizer", "scale_long"): ("core", ""),
    ("quantizer", "minmax"): ("low precision", _STABLE_SPAM),
    ("quantizer", "statsq"): ("low precision", causes.OFQ),
    ("optimizer", "spam"): ("optimizer", _SPAM),
    ("optimizer", "stable_spam"): ("optimizer", _STABLE_SPAM),
    ("optimizer", "orthograd"): ("optimizer", causes.PRIETO),
    ("optimizer", "independent_adamw"): (
        "optimizer",
        "Wortsman et al. 2023 (independent weight decay), arXiv 2309.14322",
    ),
    ("optimizer", "ALLoRA"): (
        "fine-tuning and continual learning",
        "ALLoRA, arXiv 2410.09692 (the abstract's rule; its exact form unconfirmed: docs/lora.md)",
    ),
    ("optimizer", "ConfidenceGuidedAnnealing"): ("low precision", causes.OFQ),
    ("data", "PowerLawReplay"): ("fine-tuning and continual learning", "seed-catalog #76 (power-law rehearsal)"),
    ("data", "ConfidenceDropFilter"): (
        "fine-tuning and continual learning",
        "Lee et al. 2023, open-set test-time adaptation (seed-catalog #43)",
    ),
    ("loss", "z_loss"): ("transformer", causes.PALM),
    ("loss", "router_z_loss"): ("mixture of experts", "Zoph et al. 2022, ST-MoE, arXiv 2202.08906"),
    ("loss", "teacher_intervention_loss"): (
        "low precision",
        "Kim et al. 2023, Teacher Intervention, EACL, arXiv 2302.11812",
    ),
    ("loss", "load_balancing_loss"): ("mixture of experts", "Fedus et al. 2021, Switch Transformers, arXiv 2101.03961"),
    ("loss", "stablemax_cross_entropy"): ("transformer", causes.PRIETO),
    ("loss", "pseudo_huber"): ("core", "Song & Dhariwal 2023, Improved Techniques for Training Consistency Models"),
    ("loss", "dpo_loss"): ("preference and RL", "Rafailov et al. 2023, DPO, arXiv 2305.18290"),
    ("loss", "chosen_sft_loss"): ("preference and RL", causes.RAZIN),
    ("loss", "clipped_policy_loss"): ("preference and RL", causes.DAPO),
    ("loss", "group_advantages"): ("preference and RL", "Shao et al. 2024, GRPO (DeepSeekMath), arXiv 2402.03300"),
    ("loss", "soft_overlong_punishment"): ("preference and RL", causes.DAPO),
    ("loss", "k3_kl"): ("preference and RL", causes.TRL_KL),
    ("loss", "ensemble_reward"): ("preference and RL", causes.COSTE),
    ("data", "SkipList"): ("data attribution", causes.PALM),
    ("data", "SkipListSampler"): ("data attribution", causes.PALM),
    ("data", "ches_scores"): ("preference and RL", causes.RAZIN),
    ("data", "filter_preference_pairs"): ("preference and RL", causes.RAZIN),
    ("integration", "hf"): ("core", "Hugging Face transformers Trainer (keel.integrations.hf.KeelCallback)"),
    ("integration", "lightning"): ("core", "Lightning Trainer (keel.integrations.lightning.KeelCallback)"),
    ("integration", "trl"): ("preference and RL", "TRL DPOTrainer / GRPOTrainer (keel.integrations.trl)"),
    ("integration", "watch"): ("core", "any loop: keel.watch(model, optimizer)"),
}


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One indexed component: what it is, which domain it serves, what it does, and where it comes from."""

    kind: str
    name: str
    domain: str
    summary: str
    reference: str
    default: bool = False  # on without being asked (the default probes, detectors and stabilizers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def catalog() -> list[Entry]:
    """Every component, ordered by domain, then kind, then name.

    Example:
        >>> [(e.domain, e.default) for e in catalog() if (e.kind, e.name) == ("detector", "spike")]
        [('core', True)]
    """
    from keel.detect import default_detectors
    from keel.nn.stabilize import DEFAULT_STABILIZERS

    defaults = {
        "signal": set(DEFAULT_PROBES),
        "detector": {d.name for d in default_detectors()},
        "stabilizer": set(DEFAULT_STABILIZERS),
    }
    entries = []
    for kind, name in registered() | indexed():
        target = _component(kind, name)
        domain, reference = _INDEX.get((kind, name), ("other", ""))
        entries.append(
            Entry(
                kind=kind,
                name=name,
                domain=domain,
                summary=getattr(target, "description", "") or _summary(target),
                reference=getattr(target, "reference", "") or reference,
                default=name in defaults.get(kind, set()),
            )
        )
    return sorted(entries, key=lambda e: (DOMAINS.index(e.domain), KINDS.index(e.kind), e.name))


def registered() -> set[tuple[str, str]]:
    """(kind, name) of every component in keel's registries: what the index must cover."""
    return (
        {("signal", n) for n in PROBES.names()}
        | {("detector", n) for n in DETECTORS.names()}
        | {("stabilizer", n) for n in stabilizers.names()}
        | {("optimizer", n) for n in optimizers.names()}
        | {("quantizer", n) for n in QUANTIZERS.names()}
    )


def indexed() -> set[tuple[str, str]]:
    return set(_INDEX)


def _component(kind: str, name: str) -> Any:
    registries: dict[str, Registry[Any]] = {
        "signal": PROBES,
        "detector": DETECTORS,
        "stabilizer": stabilizers,
        "optimizer": optimizers,
        "quantizer": QUANTIZERS,
    }
    if kind in registries and name in registries[kind]:
        return registries[kind].get(name)
    # not in a registry (e.g. ALLoRA, a gradient transform, not an Optimizer): the package's public attribute
    module = {
        "signal": "keel.signals",
        "detector": "keel.detect",
        "stabilizer": "keel.nn",
        "optimizer": "keel.optim",
        "quantizer": "keel.nn",
        "loss": "keel.losses",
        "data": "keel.data",
        "integration": "keel.integrations",
    }[kind]
    if kind == "integration":  # read, not imported: importing one pulls in its trainer library (seconds)
        return _ModuleText(f"{module}.{name}")
    return getattr(importlib.import_module(module), name)


class _ModuleText:
    """A module's docstring read from its source file without importing the module."""

    def __init__(self, module: str) -> None:
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        self.__doc__ = ast.get_docstring(ast.parse(Path(origin).read_text())) if origin else None


def _summary(target: Any) -> str:
    """The first sentence of the component's docstring (its class or function, else its module's)."""
    doc = inspect.getdoc(target) if isinstance(target, type) else target.__doc__
    if not doc or not doc.strip():
        doc = inspect.getmodule(target).__doc__ if inspect.getmodule(target) else ""
    first = (doc or "").strip().split("\n\n")[0].replace("\n", " ")
    return first.split(". ")[0].rstrip(".") if first else ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the index as JSON: {domain: [entries]}")
    parser.add_argument("--domain", choices=DOMAINS[:-1], help="only this domain")
    parser.add_argument("--kind", choices=KINDS, help="only this kind of component")


def main(args: argparse.Namespace) -> int:
    entries = [e for e in catalog() if args.domain in (None, e.domain) and args.kind in (None, e.kind)]
    if args.json:
        grouped: dict[str, list[dict[str, Any]]] = {}
        for entry in entries:
            grouped.setdefault(entry.domain, []).append(entry.to_dict())
        print(json.dumps(grouped, indent=2, ensure_ascii=False))
    else:
        print(format_catalog(entries))
    return 0


def format_catalog(entries: list[Entry]) -> str:
    """The text `keel list` prints: a heading per domain, one line per component, its reference indented below.

    ``*`` marks what is on by default (probes, detectors, stabilizers).
    """
    width = max((len(f"{e.kind} {e.name}") for e in entries), default=10) + 2
    lines: list[str] = []
    for domain in DOMAINS:
        members = [e for e in entries if e.domain == domain]
        if not members:
            continue
        lines += ["", domain] if lines else [domain]
        for e in members:
            label = f"{e.kind} {e.name}"
            lines.append(f"{'*' if e.default else ' '} {label:<{width}}{e.summary}")
            if e.reference:
                lines.append(" " * (width + 2) + e.reference)
    lines += ["", "* = on by default.  keel list --json | --domain D | --kind K"]
    return "\n".join(lines)
