"""Non-finite origin: forward births name the first block, backward births the last parameter."""

from __future__ import annotations

import math

import torch

from keel._core import Observation
from keel.detect.non_finite_origin import NonFiniteOriginDetector
from keel.proxy import create_proxy_model
from keel.signals.activation_rms import ActivationRmsProbe

NAN, INF = math.nan, math.inf


def test_forward_birth_and_one_report_per_episode():
    det = NonFiniteOriginDetector()
    fam = ("blocks.0", "blocks.1", "blocks.2")
    steps = [
        Observation(step=0, values={"loss": 2.0}, per_param={"act/max_abs/": (fam, [1.0, 2.0, 3.0])}),
        Observation(step=1, values={"loss": NAN}, per_param={"act/max_abs/": (fam, [1.0, INF, NAN])}),
        Observation(step=2, values={"loss": NAN}, per_param={"act/max_abs/": (fam, [NAN, NAN, NAN])}),
        Observation(step=3, values={"loss": 2.0}, per_param={"act/max_abs/": (fam, [1.0, 2.0, 3.0])}),
        Observation(step=4, values={"loss": NAN}, per_param={"act/max_abs/": (fam, [1.0, 1.0, NAN])}),
    ]
    found = [(f.step, f.evidence["module"]) for o in steps for f in det.update(o)]
    assert found == [(1, "blocks.1"), (4, "blocks.2")]


def test_backward_birth_names_the_last_parameter_with_a_bad_gradient():
    names = ("emb.weight", "blocks.0.fc.weight", "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight", "head.weight")
    obs = Observation(
        step=9,
        values={"loss": 2.5},
        per_param={
            "grad/norm/": (names, [NAN, NAN, INF, 1.0, 2.0]),
            "act/max_abs/": (("blocks.0", "blocks.1"), [3.0, 4.0]),
        },
    )
    (finding,) = NonFiniteOriginDetector().update(obs)
    assert finding.evidence["module"] == "blocks.1.attn.qkv" and finding.evidence["pass"] == "backward"
    assert finding.evidence["finite_after"] == ["blocks.1.attn.proj.weight", "head.weight"]


def test_every_gradient_non_finite_under_a_finite_loss_is_born_at_the_loss_not_in_the_last_module():
    # nanoGPT ties the head to the embedding, so its last parameter in registration order is the final norm's: a
    # NaN multiplied into the loss after the model made every gradient NaN and was blamed on transformer.ln_f
    names = ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.weight")
    obs = Observation(
        step=61,
        values={"loss": 2.9},
        per_param={"grad/norm/": (names, [NAN, NAN, NAN]), "act/max_abs/": (("transformer.h.0",), [3.0])},
    )
    (finding,) = NonFiniteOriginDetector().update(obs)
    assert (finding.evidence["module"], finding.evidence["pass"]) == ("loss", "backward")
    assert "ln_f" not in finding.cause and "backward()" in finding.cause
    assert finding.advice.startswith("Check the loss function")


def test_a_non_finite_parameter_is_no_pass_birthplace_and_left_to_the_non_finite_finding():
    # an Inf written into a weight: under bf16 autocast the loss stayed finite and every gradient went NaN
    names = ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.weight")
    obs = Observation(
        step=61, values={"loss": 3.7, "param/norm": INF}, per_param={"grad/norm/": (names, [NAN, NAN, NAN])}
    )
    assert NonFiniteOriginDetector().update(obs) == []


def test_on_a_real_model_with_nan_injected_in_one_block():
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=8)
    probe = ActivationRmsProbe()
    probe.attach(model)
    model.blocks[1].mlp.register_forward_hook(lambda m, a, out: out * NAN)
    model(torch.zeros(1, 8, dtype=torch.long))
    fam = probe.read()["act/max_abs/"]
    obs = Observation(step=3, values={"loss": NAN}, per_param={"act/max_abs/": (fam.names, fam.values.tolist())})
    (finding,) = NonFiniteOriginDetector().update(obs)
    assert finding.evidence["module"] == "blocks.1" and finding.evidence["finite_before"] == ["blocks.0"]
    probe.detach()
