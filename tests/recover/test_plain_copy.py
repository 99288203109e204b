"""`plain_copy`: the snapshot's copy of the small states (detectors, scheduler, history) equals ``copy.deepcopy``'s and
shares nothing mutable with the live state. It replaced ``deepcopy``, whose per-element bookkeeping over the divergence
detector's window of floats was most of a snapshot's time on a small model (~300 µs of ~1.7 ms)."""

from __future__ import annotations

import collections
import copy
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.recover.state import plain_copy

ATOMS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
PLAIN = st.recursive(
    ATOMS,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=4)
    ),
    max_leaves=30,
)


def _mutable_ids(value: object) -> set[int]:
    """ids of the lists and dicts inside ``value`` (those a later change of the live state could reach)."""
    found: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (list, dict)):
            found.add(id(v))
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return found


@settings(max_examples=200, deadline=None)
@given(PLAIN)
def test_a_plain_state_is_copied_as_deepcopy_copies_it_sharing_nothing_mutable(state):
    copied = plain_copy(state)
    assert copied == copy.deepcopy(state)
    assert not _mutable_ids(copied) & _mutable_ids(state)


def test_nan_floats_tensors_arrays_and_dict_subclasses_are_deep_copied():
    tensor, array = torch.arange(3.0), np.arange(3.0)
    ordered = collections.OrderedDict(a=[1.0])
    state = {"window": [math.nan, 1.0], "t": tensor, "a": array, "o": ordered, "mixed": [1.0, [2.0]]}
    copied = plain_copy(state)
    assert math.isnan(copied["window"][0]) and copied["window"] is not state["window"]
    assert torch.equal(copied["t"], tensor) and copied["t"].data_ptr() != tensor.data_ptr()
    assert np.array_equal(copied["a"], array) and copied["a"] is not array
    assert (
        copied["o"] == ordered and type(copied["o"]) is collections.OrderedDict and copied["o"]["a"] is not ordered["a"]
    )
    assert copied["mixed"][1] is not state["mixed"][1]
