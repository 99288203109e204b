"""One registration per name in `Guard.track` (reviewer V5 of session 13: two EMAs tracked with the default name,
the second silently replaced the first, and a rollback left the first on the damaged trajectory)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from keel import Guard


class _Position:
    def state_dict(self):
        return {"index": 3}

    def load_state_dict(self, state):
        pass


def _guard():
    model = nn.Linear(4, 1)
    return model, Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_second_object_under_a_name_already_registered_is_refused_naming_it():
    model, guard = _guard()
    ema_a, ema_b = AveragedModel(model), AveragedModel(model)
    guard.track(ema_a)
    with pytest.raises(ValueError, match=r"track\(AveragedModel, name='data'\): 'data' is registered already"):
        guard.track(ema_b)
    with pytest.raises(ValueError, match=r"allowed: a name of its own, e.g. guard.track\(obj, name='data_2'\)"):
        guard.track(_Position())  # a data position under the EMA's name
    guard.track(ema_b, name="ema_slow").track(ema_a)  # its own name; the same object again changes nothing
    assert guard.state.averaged == {"data": ema_a, "ema_slow": ema_b}
    guard.close()
