"""Forwards under ``torch.no_grad()`` with the model in train mode are not the training step's (reviewer h26 V1).

An RL loop's rollouts (``model.generate()``), old and reference log-prob passes, and a validation written without
``model.eval()`` all run under no_grad in train mode. The hook probes counted them: the recorded attention entropy,
activation RMS and logit statistics mixed in batches that were never trained on, and on a batch of another scale a
healthy run was rolled back twice for attention logit growth. keel's loss capture already left such forwards out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keel import Guard
from keel.proxy import ProxyBatches, create_proxy_model
from keel.store import RunReader


def _signals(run_dir, extra_forward):
    """A tiny proxy LM under the transformer probes; ``extra_forward(model, x)`` runs before each training forward."""
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = ProxyBatches(batch_size=4, seq_len=16, seed=0)
    with Guard(model, opt, probes="transformer", run_dir=str(run_dir)) as guard:
        for _ in range(6):
            x, y = batches.next()
            extra_forward(model, x)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            guard.step(loss)
            opt.zero_grad(set_to_none=True)
    with RunReader(run_dir) as run:
        return {key: run.signal(key)[1].tolist() for key in run.signal_keys()}


def _rollout(model, x):
    with torch.no_grad():
        model(torch.flip(x, dims=[1]))  # another batch, as a rollout's or a reference pass's


def _rollout_in_inference_mode(model, x):
    with torch.inference_mode():
        model(torch.flip(x, dims=[1]))


def _nothing(model, x):
    pass


@pytest.mark.parametrize("extra", [_rollout, _rollout_in_inference_mode], ids=["no_grad", "inference_mode"])
def test_a_no_grad_forward_in_train_mode_leaves_every_recorded_signal_as_it_was(tmp_path, extra):
    plain = _signals(tmp_path / "plain", _nothing)
    with_rollouts = _signals(tmp_path / "rollouts", extra)
    hooked = [k for k in plain if k.startswith(("attn/", "act/", "logits/", "output/"))]
    assert hooked, sorted(plain)  # the transformer probes did record what the hooks measure
    assert with_rollouts.keys() == plain.keys()
    differ = [k for k in plain if with_rollouts[k] != plain[k] and k != "time/step"]
    assert differ == []
