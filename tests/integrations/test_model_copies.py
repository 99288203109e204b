"""A model under keel copies like any other: ``copy.deepcopy(model)`` (an EMA, a DPO reference model) and
``torch.save(model)`` work, and the copies' forwards feed none of keel's probes (`keel.signals._hooks.ObserverHook`).

Before, `keel.watch`'s loss hook and the transformer probes' hooks were bound methods and closures kept on the
model: a deep copy of a watched model and a whole-model ``torch.save`` raised (the pickle reached the guard's open
store) and killed the run, and a deep copy made under `keel.Guard` fed its forwards to the original's probes.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import keel
from keel.proxy import create_proxy_model
from keel.signals._hooks import ObserverHook
from keel.store import RunReader
from tests.integrations.autocast_run import PROBE_SETS, every_step

SEQ = 16


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def _watched(how: str, run_dir: object = None) -> tuple[nn.Module, object, Callable[[nn.Module], None]]:
    """The tiny proxy under `keel.watch` or a `keel.Guard` with a probe set, and one training step of it."""
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kwargs = {"run_dir": None if run_dir is None else str(run_dir), "log_every": 1}
    probes = every_step(PROBE_SETS[how]) if how in PROBE_SETS else None  # each hook probe measures every step
    guard = keel.watch(model, opt, **kwargs) if probes is None else keel.Guard(model, opt, probes=probes, **kwargs)
    seen = [0]

    def step(extra_forward: nn.Module | None = None) -> None:
        x = _batch(seen[0])
        seen[0] += 1
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        if extra_forward is not None:  # a copy's training-mode forward inside the step, as an EMA update might
            extra_forward(_batch(100)[:, :-1] // 2).sum().backward()  # other data: other activations
        loss.backward()
        opt.step() if how == "watch" else guard.step(loss)
        opt.zero_grad(set_to_none=True)

    return model, guard, step


def _keel_hooks(model: nn.Module) -> list[ObserverHook]:
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert all(isinstance(h, ObserverHook) for h in hooks), hooks  # every hook on the proxy is one of keel's
    return hooks


@pytest.mark.parametrize("how", ["watch", "default", "transformer", "full"])
def test_a_watched_model_deep_copies_and_saves_whole_and_the_copies_carry_keels_hooks_inert(how):
    model, guard, step = _watched(how)
    step()
    ema = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copied in (ema, loaded):
        assert all(h.fn is None for h in _keel_hooks(copied))
        assert torch.equal(copied(_batch(9)[:, :-1]), model(_batch(9)[:, :-1]))
    assert all(h.fn is not None for h in _keel_hooks(model))  # the model itself keeps observing
    step()  # training goes on under keel
    assert guard.global_step == 2
    guard.close()


def test_a_deep_copys_forward_inside_a_step_leaves_the_transformer_probes_values_unchanged(tmp_path):
    values = {}
    for with_copy in (False, True):
        model, guard, step = _watched("transformer", tmp_path / str(with_copy))
        step()
        step(copy.deepcopy(model) if with_copy else None)
        guard.close()
        with RunReader(tmp_path / str(with_copy)) as run:
            values[with_copy] = {k: run.signal(k)[1].tolist() for k in run.signal_keys() if k.startswith("act/")}
    assert values[False] and values[True] == values[False]
