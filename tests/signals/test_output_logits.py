"""Output-logit statistics and probe: log Z, scale, softmax collapse and zero loss against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keel.proxy import create_proxy_model
from keel.signals.logit_stats import (
    log_partition,
    softmax_collapse_fraction,
    softmax_collapse_mask,
    zero_loss_fraction,
)
from keel.signals.output_logits import OutputLogitsConfig, OutputLogitsProbe

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def logits(seed=0, shape=(6, 9), scale=4.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_partition_matches_float64(dtype):
    z = logits().to(dtype)
    x = z.double().numpy()
    m = x.max(-1, keepdims=True)
    expected = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    np.testing.assert_allclose(log_partition(z).numpy(), expected, rtol=1e-6 if dtype != torch.float64 else 1e-12)


def test_log_partition_masked_and_nan():
    z = torch.tensor([[0.0, -math.inf, -math.inf], [-math.inf] * 3, [math.nan, 0.0, 0.0]])
    got = log_partition(z)
    assert got[0] == 0.0 and got[1] == -math.inf and math.isnan(got[2])


def test_softmax_collapse_depends_on_the_working_precision():
    # a gap of 12 leaves Σ exp = 1 + 2·6.1e-6: above float32's half-ulp of 1 (6e-8), below float16's (4.9e-4)
    z = torch.tensor([[0.0, -12.0, -12.0], [0.0, -1.0, -2.0], [0.0, -200.0, -300.0]])
    expected = {
        torch.float64: [False, False, True],
        torch.float32: [False, False, True],
        torch.bfloat16: [True, False, True],
        torch.float16: [True, False, True],
    }
    for dtype, want in expected.items():
        collapsed, s = softmax_collapse_mask(z, dtype)
        ref = np.exp(z.to(dtype).double().numpy() - 0.0)  # reference sum in float64 of the rounded logits
        assert collapsed.tolist() == want, dtype
        assert s.dtype == dtype and float(s[1]) == pytest.approx(ref[1].sum(), rel=1e-2)
    assert float(softmax_collapse_fraction(z, torch.float16)) == pytest.approx(2 / 3)
    assert float(softmax_collapse_fraction(z)) == pytest.approx(1 / 3)  # default: the logits' own dtype


def test_zero_loss_needs_the_target_to_be_the_max():
    z = torch.tensor([[0.0, -200.0], [0.0, -200.0], [0.0, -1.0]])
    y = torch.tensor([0, 1, 0])
    reference = (-F.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1) == 0).float().mean()
    assert float(zero_loss_fraction(z, y)) == float(reference) == pytest.approx(1 / 3)


def test_probe_on_proxy_matches_the_head_output():
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16)
    probe = OutputLogitsProbe()
    probe.attach(model)
    idx = torch.randint(0, 256, (3, 16))
    out = model(idx)
    F.cross_entropy(out.flatten(0, 1), idx.flatten()).backward()  # a classifier: the loss sees it through a softmax
    out = out.detach().double()
    got = probe.read()
    lse = torch.logsumexp(out, -1)
    assert float(got["logits/log_z"]) == pytest.approx(float(lse.mean()), rel=1e-6)
    assert float(got["logits/log_z_max"]) == pytest.approx(float(lse.max()), rel=1e-6)
    assert float(got["logits/log_z_min"]) == pytest.approx(float(lse.min()), rel=1e-6)
    assert float(got["logits/rms"]) == pytest.approx(float(out.square().mean().sqrt()), rel=1e-5)
    assert float(got["logits/mean"]) == pytest.approx(float(out.mean()), rel=1e-4, abs=1e-7)
    assert float(got["logits/softmax_collapse"]) == 0.0
    assert "logits/zero_loss" not in got
    probe.detach()


def test_targets_from_set_targets_and_from_hugging_face_labels():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 3, bias=False)
            with torch.no_grad():
                self.head.weight.copy_(torch.tensor([[300.0, 0.0], [0.0, 0.0], [-300.0, 0.0]]))

        def forward(self, x, labels=None):
            return self.head(x)

    model = Head()
    probe = OutputLogitsProbe()
    probe.attach(model)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    probe.set_targets(torch.tensor([0, 1, 0]))
    model(x)
    got = probe.read()
    assert float(got["logits/softmax_collapse"]) == pytest.approx(2 / 3)  # rows 0, 1 collapsed; row 2 uniform
    assert float(got["logits/zero_loss"]) == pytest.approx(1 / 3)  # only row 0's target is its max
    # Hugging Face style: labels passed to forward, -100 ignored; not shifted (not a causal LM): position 2 is uniform
    model(x.unsqueeze(0), labels=torch.tensor([[-100, -100, 0]]))
    assert float(probe.read()["logits/zero_loss"]) == 0.0
    probe.detach()

    class TinyForCausalLM(Head):  # a causal LM's labels are the next tokens: shifted by one, as its loss does
        pass

    model = TinyForCausalLM()
    probe = OutputLogitsProbe()
    probe.attach(model)
    probe.set_targets(torch.tensor([0, 1, 0]))
    model(x)
    probe.read()
    model(x.unsqueeze(0), labels=torch.tensor([[-100, -100, 0]]))
    assert float(probe.read()["logits/zero_loss"]) == 1.0  # position 1 predicts label 0: collapsed and right
    probe.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_head_is_judged_in_its_own_precision(dtype):
    head = nn.Linear(4, 5).to(dtype)
    probe = OutputLogitsProbe()
    probe.attach(head)
    x = torch.randn(7, 4).to(dtype) * 3
    out = head(x)
    F.cross_entropy(out.float(), torch.randint(0, 5, (7,))).backward()
    out = out.detach()
    got = probe.read()
    assert float(got["logits/softmax_collapse"]) == float(softmax_collapse_fraction(out))
    assert float(got["logits/log_z"]) == pytest.approx(float(torch.logsumexp(out.double(), -1).mean()), rel=1e-6)
    probe.detach()


def test_nan_logits_and_schedule_and_validation():
    head = nn.Linear(2, 3)
    probe = OutputLogitsProbe(every=2)
    probe.attach(head)
    F.cross_entropy(head(torch.randn(4, 2)), torch.tensor([0, 1, 2, 0])).backward()  # shows it is a classifier
    probe.read()
    head(torch.tensor([[math.nan, 0.0]]))
    assert math.isnan(float(probe.read()["logits/log_z"]))
    from tests.signals.test_attn_logits import _ctx

    seen = []
    for step in range(4):
        head(torch.randn(2, 2))
        seen.append(bool(probe.measure(_ctx(step))))
    assert seen == [True, False, True, False]  # due at steps 0 and 2
    with pytest.raises(ValueError, match=r"OutputLogitsConfig.precision='fp8'; allowed: None, float16"):
        OutputLogitsConfig(precision="fp8")
    probe.detach()


# --- which heads are measured: only a softmax classifier's output layer ----------------------------------------


def _step(model, x, loss_fn):
    """One training step's forward and backward (the gradient is what tells a softmax loss apart)."""
    out = model(x)
    loss_fn(out).backward()
    model.zero_grad(set_to_none=True)


def _mlp(outputs):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, outputs))


def test_one_output_regressor_emits_nothing():
    # the false critical: a softmax over one value is always exactly one-hot
    model, probe = _mlp(1), OutputLogitsProbe()
    probe.attach(model)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(3):
        _step(model, x, lambda out: F.mse_loss(out, y))
        assert probe.read() == {}
    assert "one output per row" in probe.status
    probe.detach()


def test_one_logit_binary_classifier_emits_nothing():
    model, probe = _mlp(1), OutputLogitsProbe(module="2")  # even when named: no softmax over one logit
    probe.attach(model)
    x, y = torch.randn(16, 4), (torch.rand(16, 1) > 0.5).float()
    _step(model, x, lambda out: F.binary_cross_entropy_with_logits(out, y))
    assert probe.read() == {}
    probe.detach()


@pytest.mark.parametrize("task", ["regression", "multi_label"])
def test_multi_output_regressor_and_sigmoid_multi_label_head_emit_nothing(task):
    # three outputs, so the shape alone cannot tell: targets of very different scales made the old probe call
    # 12 % of a regressor's rows "collapsed"
    model, probe = _mlp(3), OutputLogitsProbe()
    probe.attach(model)
    x = torch.randn(16, 4)
    scale = torch.tensor([30.0, 1.0, 10.0])
    y = torch.randn(16, 3) * scale if task == "regression" else (torch.rand(16, 3) > 0.7).float()
    loss = (
        (lambda out: F.mse_loss(out, y))
        if task == "regression"
        else (lambda out: F.binary_cross_entropy_with_logits(out, y))
    )
    for _ in range(4):
        _step(model, x, loss)
        assert probe.read() == {}
    assert "softmax" in probe.status
    probe.detach()


@pytest.mark.parametrize("classes", [2, 7])
def test_softmax_classifier_found_as_last_linear_is_measured_from_the_first_step(classes):
    model, probe = _mlp(classes), OutputLogitsProbe()
    probe.attach(model)
    x, y = torch.randn(16, 4), torch.randint(0, classes, (16,))
    out = model(x)
    F.cross_entropy(out, y, label_smoothing=0.1).backward()
    got = probe.read()
    assert float(got["logits/log_z"]) == pytest.approx(float(torch.logsumexp(out.detach(), -1).mean()), rel=1e-6)
    assert probe.status == "a softmax classifier head"
    probe.detach()


class _Returns(nn.Module):
    """A classifier whose head is the last Linear, returning its logits inside a container."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.body, self.head = kind, nn.Linear(4, 8), nn.Linear(8, 5)

    def forward(self, x):
        logits = self.head(torch.relu(self.body(x)))
        if self.kind == "tuple":
            return logits, x.sum()
        if self.kind == "dict":
            return {"loss": x.sum(), "logits": logits}
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=logits)


@pytest.mark.parametrize("kind", ["tuple", "dict", "model_output"])
def test_classifier_returning_a_tuple_dict_or_model_output_is_measured(kind):
    torch.manual_seed(0)
    model, probe = _Returns(kind), OutputLogitsProbe()
    probe.attach(model)
    out = model(torch.randn(6, 4))
    logits = out[0] if kind == "tuple" else out["logits"]
    F.cross_entropy(logits, torch.randint(0, 5, (6,))).backward()
    assert "logits/softmax_collapse" in probe.read()
    probe.detach()


class _Pooled(nn.Module):
    """An encoder with its classifier registered before the pooler: the last Linear is an inner layer."""

    def __init__(self):
        super().__init__()
        self.emb, self.classifier, self.pooler = nn.Embedding(16, 8), nn.Linear(8, 4), nn.Linear(8, 8)

    def forward(self, idx):
        h = self.emb(idx).mean(1)
        return {"logits": self.classifier(h), "pooled": torch.tanh(self.pooler(h))}


def test_last_linear_that_is_not_the_models_output_is_not_measured():
    torch.manual_seed(0)
    model, probe = _Pooled(), OutputLogitsProbe()
    probe.attach(model)
    out = model(torch.randint(0, 16, (6, 5)))
    (F.cross_entropy(out["logits"], torch.randint(0, 4, (6,))) + out["pooled"].square().mean()).backward()
    assert probe.head == "pooler" and probe.read() == {}
    assert "not the model's output" in probe.status
    probe.detach()


def test_targets_outside_the_classes_count_as_ignored_and_never_break_the_forward():
    # segmentation's ignore_index=255 with 3 classes: the old gather indexed out of range inside the user's forward
    model, probe = _mlp(3), OutputLogitsProbe()
    probe.attach(model)
    x, y = torch.randn(4, 4), torch.tensor([0, 255, 1, -100])
    probe.set_targets(y)
    out = model(x)
    F.cross_entropy(out[[0, 2]], y[[0, 2]]).backward()
    got = probe.read()
    top = out.detach().argmax(-1)
    expected = ((top[[0, 2]] == y[[0, 2]]) & (torch.softmax(out.detach()[[0, 2]], -1).amax(-1) == 1)).float().mean()
    assert float(got["logits/zero_loss"]) == float(expected)
    probe.detach()


def test_a_failing_hook_never_breaks_the_forward_and_is_reported_at_read():
    model, probe = _mlp(3), OutputLogitsProbe()
    probe.attach(model)
    probe._reduce = lambda *a: 1 / 0  # an error inside the reduction
    out = model(torch.randn(2, 4))  # the user's forward still runs
    assert out.shape == (2, 3)
    with pytest.raises(RuntimeError, match="output-logit hook failed"):
        probe.read()
    probe.detach()


def test_integer_output_head_is_not_measured():
    class ArgmaxHead(nn.Module):
        def forward(self, x):
            return x.argmax(-1, keepdim=True).expand(-1, 3)

    model = nn.Sequential(nn.Linear(4, 3), ArgmaxHead())
    probe = OutputLogitsProbe(module="1")
    probe.attach(model)
    model(torch.randn(2, 4))
    assert probe.read() == {}
    probe.detach()


def test_a_multi_label_mask_given_as_targets_is_no_evidence_of_a_softmax():
    model, probe = _mlp(3), OutputLogitsProbe()
    probe.attach(model)
    x, y = torch.randn(16, 4), torch.rand(16, 3) > 0.7
    for _ in range(4):
        probe.set_targets(y)  # a bool mask of the logits' own shape: labels of a sigmoid head, not classes
        _step(model, x, lambda out: F.binary_cross_entropy_with_logits(out, y.float()))
        assert probe.read() == {}
    probe.detach()
