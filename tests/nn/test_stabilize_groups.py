"""keel.stabilize with an optimizer: the new gains and biases go where nanoGPT, HF and timm put 1-D parameters."""

from __future__ import annotations

import pytest
import torch

from keel.nn import NoDecayGroupWarning, create_stabilizer, stabilize
from keel.optim import IndependentAdamW
from tests.nn._models import NanoGPT, lm_loss, nanogpt_optimizer
from tests.nn.test_scale_long import TinyUViT

STABILIZERS = ["qk_norm", "sigma_reparam", "z_loss"]


def _group_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    (group,) = [g for g in optimizer.param_groups if any(q is p for q in g["params"])]
    return group


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def test_adamw_weight_decay_new_gains_join_a_no_decay_copy_of_their_group() -> None:
    torch.manual_seed(0)
    model = NanoGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1)
    old = list(model.parameters())
    result = stabilize(model, STABILIZERS, optimizer=opt)
    new = result.new_parameters
    assert new and all(p.dim() < 2 for p in new)  # QK-norm gains/biases and σReparam's γ
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    assert _hyper(no_decay) == {**_hyper(decay), "weight_decay": 0.0}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in new}
    assert {id(p) for p in decay["params"]} == {id(p) for p in old}
    # What the group means: with zero gradients AdamW's step is pure decay. The new gains do not shrink.
    gains = [p.detach().clone() for p in new]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    weight = model.attn[0].c_proj.parametrizations.weight.original
    before = weight.detach().clone()
    opt.step()
    assert all(torch.equal(p, g) for p, g in zip(new, gains, strict=True))
    torch.testing.assert_close(weight, before * (1 - 1e-3 * 0.1))


def test_nanogpt_two_groups_take_the_new_gains_into_their_no_decay_group() -> None:
    torch.manual_seed(0)
    model = NanoGPT(bias=False)
    opt = nanogpt_optimizer(model)
    decay_before = list(opt.param_groups[0]["params"])
    result = stabilize(model, STABILIZERS, optimizer=opt)
    assert len(opt.param_groups) == 2  # nanoGPT's own no-decay group fits: no third group
    decay, no_decay = opt.param_groups
    assert [id(p) for p in decay["params"]] == [id(p) for p in decay_before]
    assert {id(p) for p in result.new_parameters} <= {id(p) for p in no_decay["params"]}
    opt.zero_grad()
    lm_loss(model, torch.randint(0, 50, (2, 8))).backward()
    opt.step()


def test_several_groups_each_get_their_own_no_decay_twin_with_their_hyper_parameters() -> None:
    torch.manual_seed(0)
    model = NanoGPT()
    layer0 = [p for n, p in model.named_parameters() if n.startswith("attn.0.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("attn.0.")]
    opt = torch.optim.AdamW(
        [{"params": layer0, "lr": 1e-2, "weight_decay": 0.2}, {"params": rest, "lr": 1e-3}], weight_decay=0.1
    )
    stabilize(model, ["qk_norm"], optimizer=opt)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        (1e-2, 0.2),
        (1e-3, 0.1),
        (1e-2, 0.0),
        (1e-3, 0.0),
    ]
    for i, attn in enumerate(model.attn):
        for p in (*attn.q_norm.parameters(), *attn.k_norm.parameters()):
            assert _group_of(opt, p) is opt.param_groups[2 + i]


def test_independent_adamw_zeroes_its_own_decay_key() -> None:
    torch.manual_seed(0)
    model = NanoGPT()
    opt = IndependentAdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    result = stabilize(model, ["qk_norm"], optimizer=opt)
    group = _group_of(opt, result.new_parameters[0])
    assert group is opt.param_groups[1]
    assert group["independent_weight_decay"] == 0.0 and opt.param_groups[0]["independent_weight_decay"] == 1e-4


def test_new_matrices_keep_their_groups_decay_and_only_their_biases_skip_it() -> None:
    # ScaleLong's calibration MLP: its weights are matrices (decayed, as any Linear's), its biases 1-D.
    torch.manual_seed(0)
    model = TinyUViT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    stabilize(model, [create_stabilizer("scale_long", mode="calibrated", tokens=6, reduction=2)], optimizer=opt)
    calib = model.long_skip_calibration
    assert _group_of(opt, calib.fc1.weight) is opt.param_groups[0]
    assert _group_of(opt, calib.fc1.bias) is opt.param_groups[1]
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_a_scheduler_built_before_keeps_working_and_the_fallback_is_warned() -> None:
    # torch's schedulers zip their per-group lists with the optimizer's groups strictly: a group added after
    # them makes scheduler.step() raise. So stabilize adds none, and says what the new gains got instead.
    torch.manual_seed(0)
    model = NanoGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    with pytest.warns(NoDecayGroupWarning, match=r"weight_decay=0\.1.*before building the LR scheduler") as record:
        result = stabilize(model, ["qk_norm"], optimizer=opt)
    assert len(record) == 1 and len(opt.param_groups) == 1
    assert all(_group_of(opt, p) is opt.param_groups[0] for p in result.new_parameters)
    opt.step()
    scheduler.step()


def test_no_weight_decay_anywhere_adds_no_group() -> None:
    torch.manual_seed(0)
    model = NanoGPT()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    result = stabilize(model, STABILIZERS, optimizer=opt)
    assert len(opt.param_groups) == 1
    assert all(_group_of(opt, p) is opt.param_groups[0] for p in result.new_parameters)


def test_named_parameter_groups_keep_names_and_params_in_step() -> None:
    torch.manual_seed(0)
    model = NanoGPT()
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    stabilize(model, ["qk_norm"], optimizer=opt)
    decay, no_decay = opt.param_groups
    expected = [f"attn.{i}.{qk}_norm.{w}" for i in (0, 1) for qk in "qk" for w in ("weight", "bias")]
    assert no_decay["param_names"] == expected
    assert len(decay["param_names"]) == len(decay["params"])
    opt.zero_grad()
    lm_loss(model, torch.randint(0, 50, (2, 8))).backward()
    opt.step()
    saved = opt.state_dict()["param_groups"]
    assert [g["param_names"] for g in saved] == [decay["param_names"], expected]
