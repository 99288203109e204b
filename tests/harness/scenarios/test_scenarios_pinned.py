"""The zoo's proxy-LM runs, pinned bit for bit: each hook a scenario uses (a batch function, an LR factor, a
model edit, extra probes, a constant LR, the fine-tunes' pre-trained base) must train exactly as before.

Recorded before the scenario loop and the proxy trainer became one (issue 15, item 1), on one intra-op thread;
see tests/proxy/test_losses_pinned.py for when re-recording is legitimate. `keel bench detect` compares the
full runs' findings.
"""

from __future__ import annotations

import pytest

from keel.harness.scenarios import _finetune, create_scenario

# scenario → (steps, training losses): run(steps=...) under the observing Guard
PINNED_RUNS = {
    "lr_spike": (4, ["0x1.66472c0000000p+2", "0x1.63c48c0000000p+2", "0x1.5e4c3e0000000p+2", "0x1.57284e0000000p+2"]),
    "curriculum_switch": (
        4,
        ["0x1.6516520000000p+2", "0x1.63c2820000000p+2", "0x1.5e7ee00000000p+2", "0x1.56c2d20000000p+2"],
    ),
    "non_finite_origin": (
        4,
        ["0x1.66472c0000000p+2", "0x1.54eaf20000000p+2", "0x1.34abc60000000p+2", "0x1.0845580000000p+2"],
    ),
    "benign_oscillation": (
        24,
        [
            "0x1.650d380000000p+2",
            "0x1.5d9f240000000p+2",
            "0x1.5425200000000p+2",
            "0x1.4820460000000p+2",
            "0x1.47461a0000000p+2",
            "0x1.347fa40000000p+2",
            "0x1.2899c60000000p+2",
            "0x1.1ed6f60000000p+2",
            "0x1.09c62a0000000p+2",
            "0x1.f6e55e0000000p+1",
            "0x1.d8df0c0000000p+1",
            "0x1.dbb67c0000000p+1",
            "0x1.9724fe0000000p+1",
            "0x1.cf6be40000000p+1",
            "0x1.8a998c0000000p+1",
            "0x1.7934240000000p+1",
            "0x1.a5d32e0000000p+1",
            "0x1.b581500000000p+1",
            "0x1.9d990c0000000p+1",
            "0x1.ad2fee0000000p+1",
            "0x1.8b73180000000p+1",
            "0x1.7e6f060000000p+1",
            "0x1.893b160000000p+1",
            "0x1.a0bade0000000p+1",
        ],
    ),
}
# The fine-tunes on a base pre-trained for 30 steps instead of 1,200 (the same loop, shorter).
PINNED_FINETUNES = {
    "full_finetune": ["0x1.952bd20000000p+1", "0x1.a920f60000000p+1", "0x1.cc89a60000000p+1", "0x1.93e58e0000000p+1"],
    "qlora_finetune": ["0x1.a2ef760000000p+1", "0x1.af120c0000000p+1", "0x1.a955820000000p+1", "0x1.d845400000000p+1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PINNED_RUNS))
def test_scenario_losses_are_bit_identical_to_the_pinned_run(name, one_torch_thread):
    steps, losses = PINNED_RUNS[name]
    result = create_scenario(name).run(steps=steps)
    assert [v.hex() for v in result.losses] == losses
    assert result.alarms() == []


@pytest.mark.slow
def test_reference_run_without_guard_is_bit_identical_to_the_pinned_run(one_torch_thread):
    losses = create_scenario("poisoned_batch").reference(steps=4)
    assert [v.hex() for v in losses] == PINNED_RUNS["lr_spike"][1]  # the same healthy recipe, unguarded


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PINNED_FINETUNES))
def test_finetune_losses_are_bit_identical_to_the_pinned_run(name, monkeypatch, one_torch_thread):
    monkeypatch.setattr(_finetune, "BASE_STEPS", 30)
    _finetune.pretrained_base.cache_clear()
    try:
        result = create_scenario(name).run(steps=4)
    finally:
        _finetune.pretrained_base.cache_clear()  # no other test may see the 30-step base
    assert [v.hex() for v in result.losses] == PINNED_FINETUNES[name]
