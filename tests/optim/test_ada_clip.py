"""AdaClip as a standalone gradient transform, against a float64 re-derivation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keel.optim import AdaClip
from tests.integrations.test_compile import GraphCounter


class AdaClipReference:
    def __init__(self, gamma: float) -> None:
        self.gamma, self.t, self.ema = gamma, 0, 0.0

    def clip(self, g: np.ndarray) -> np.ndarray:
        g = g.astype(np.float64).copy()
        self.t += 1
        peak = np.abs(g).max()
        self.ema = self.gamma * self.ema + (1 - self.gamma) * peak
        threshold = self.ema / (1 - self.gamma**self.t)
        spiked = np.abs(g) > threshold
        g[spiked] = g[spiked] / peak * threshold
        return g


def test_matches_float64_and_puts_a_spike_exactly_on_the_threshold() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(8, 8))
    clipper = AdaClip([p], gamma=0.99)
    ref = AdaClipReference(0.99)
    for t in range(1, 41):
        g = torch.randn(8, 8, generator=gen)
        if t == 40:
            g[3, 4] = 500.0
        p.grad = g.clone()
        ratio = clipper.clip_()
        expected = ref.clip(g.numpy())
        np.testing.assert_allclose(p.grad.numpy(), expected, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")
    threshold = ref.ema / (1 - 0.99**40)
    assert p.grad[3, 4].item() == pytest.approx(threshold, rel=1e-5)  # the largest entry lands on M̂
    assert ratio.item() == pytest.approx(500.0 / threshold, rel=1e-4)


def test_attach_runs_before_every_step_and_state_round_trips() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    clipper = AdaClip(model.parameters(), gamma=0.5)
    handle = clipper.attach(opt)
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    state = clipper.state_dict()
    assert state["steps"] == [3, 3]
    other = AdaClip(model.parameters())
    other.load_state_dict(state)
    assert other.gamma == 0.5 and torch.equal(other._ema[0], clipper._ema[0])
    handle.remove()
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert clipper.state_dict()["steps"] == [3, 3]  # detached: no more clipping


def test_params_without_grad_are_skipped_and_bad_arguments_raise() -> None:
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    clipper = AdaClip([a, b])
    a.grad = torch.ones(3)
    clipper.clip_()
    assert clipper.state_dict()["steps"] == [1, 0]
    zero = AdaClip([b])
    b.grad = torch.zeros(3)
    zero.clip_()
    assert torch.equal(b.grad, torch.zeros(3))
    with pytest.raises(ValueError, match="AdaClip.gamma="):
        AdaClip([a], gamma=1.0)
    with pytest.raises(ValueError, match="empty"):
        AdaClip([])
    with pytest.raises(ValueError, match="parameters"):
        clipper.load_state_dict({"gamma": 0.9, "steps": [1], "ema": [None]})


def test_tracked_by_a_guard_its_statistics_resume_with_the_run(tmp_path):
    # AdaClip's running maxima are its own, in no optimizer state: a resumed run restarted them (reviewer V14)
    import torch.nn.functional as F

    from keel import Guard, RecoveryConfig
    from tests.conftest import TinyNet, make_batches

    def run(resume, stop):
        torch.manual_seed(0)
        model = TinyNet()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        clipper = AdaClip(model.parameters())
        clipper.attach(opt)
        config = RecoveryConfig(snapshot_every=5, disk_every=1)
        guard = Guard(model, opt, run_dir=str(tmp_path), policy="recover", resume=resume, recovery=config)
        guard.track(clipper, name="ada_clip")
        seen = {guard.global_step: clipper.state_dict()}
        for step, (x, y) in list(enumerate(make_batches(stop)))[guard.global_step :]:
            loss = F.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
            guard.recovery.disk.wait()
            seen[step + 1] = clipper.state_dict()
        guard.close()
        return seen

    before = run(False, 12)
    after = run(True, 12)
    start = min(after)
    assert start == 10 and after[start]["steps"] == before[start]["steps"]
    assert all(torch.equal(a, b) for a, b in zip(after[start]["ema"], before[start]["ema"], strict=True))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_leaves_the_statistics_and_clipping_goes_on(bad: float) -> None:
    # an fp16 AMP loop's overflow step (inf gradients, skipped by the GradScaler) made the running max inf (or NaN)
    # and switched clipping off for the rest of the run (reviewer V16)
    p = torch.nn.Parameter(torch.zeros(1000))
    clipper, reference = AdaClip([p]), AdaClip([torch.nn.Parameter(torch.zeros(1000))])
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        g = torch.randn(1000, generator=gen)
        for c, q in ((clipper, p), (reference, reference.params[0])):
            q.grad = g.clone()
            c.clip_()
    poisoned = torch.randn(1000, generator=gen)
    poisoned[3] = bad
    p.grad = poisoned
    clipper.clip_()
    assert clipper.state_dict()["steps"] == reference.state_dict()["steps"]  # the bad step did not count
    torch.testing.assert_close(clipper.state_dict()["ema"][0], reference.state_dict()["ema"][0], rtol=0, atol=0)
    spike = torch.randn(1000, generator=gen) * 1000
    p.grad = spike.clone()
    assert clipper.clip_().item() > 10  # the spike is seen and clipped
    assert p.grad.abs().max().item() < spike.abs().max().item() / 10


def test_a_sparse_gradient_is_one_clear_error() -> None:
    # nn.Embedding(sparse=True): torch's internal "Could not run 'aten::aminmax' ... SparseCPU" before (reviewer V13)
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    clipper = AdaClip(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        clipper.clip_()


def test_clip_called_inside_a_compiled_function_runs_eagerly_without_recompiling() -> None:
    """The step counts are host ints: dynamo recompiled clip_ at every step (20 graphs in 8 steps)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    eager_params = [
        torch.nn.Parameter(torch.randn(6, 4, generator=gen)),
        torch.nn.Parameter(torch.randn(4, generator=gen)),
    ]
    compiled_params = [torch.nn.Parameter(p.detach().clone()) for p in eager_params]
    eager, compiled = AdaClip(eager_params), AdaClip(compiled_params)
    backend = GraphCounter()
    clip = torch.compile(lambda: compiled.clip_(), backend=backend)
    for step in range(6):
        for p, q in zip(eager_params, compiled_params, strict=True):
            p.grad = torch.randn(p.shape, generator=gen) * (100.0 if step == 4 else 1.0)  # a spike at step 4
            q.grad = p.grad.clone()
        assert torch.equal(eager.clip_(), clip())
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(eager_params, compiled_params, strict=True))
    assert backend.compiled == 0
