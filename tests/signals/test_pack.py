import math

import torch

from keel.signals.pack import pack, unpack
from keel.signals.probe import PerParam


def test_round_trip_keeps_keys_values_and_groups():
    a = {"loss": torch.tensor(2.5), "grad/norm/": PerParam(("w", "b"), torch.tensor([1.0, 2.0]))}
    b = {"update/norm": torch.tensor(0.125, dtype=torch.bfloat16)}
    (va, pa), (vb, pb) = unpack(pack(a, b))
    assert va == {"loss": 2.5}
    assert pa == {"grad/norm/": (("w", "b"), [1.0, 2.0])}
    assert vb == {"update/norm": 0.125} and pb == {}


def test_extremes_survive_the_wire():
    ((values, _),) = unpack(
        pack({"big": torch.tensor(3.0e38), "nan": torch.tensor(float("nan")), "inf": torch.tensor(float("-inf"))})
    )
    assert values["big"] == torch.tensor(3.0e38).item()
    assert math.isnan(values["nan"]) and values["inf"] == float("-inf")


def test_empty_groups():
    assert unpack(pack({}, {})) == [({}, {}), ({}, {})]
