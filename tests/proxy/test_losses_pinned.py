"""The proxy trainer's losses, pinned bit for bit: refactoring the trainer must not change a single run.

The values were recorded from the trainer and the scenario loop as they were before they became one (issue 15,
item 1), on one intra-op thread. They are float32 losses of this torch build's CPU kernels: another torch
version or CPU instruction set may round differently, and then the pins are re-recorded from an unrefactored
commit, never adjusted to make a refactor pass.
"""

from __future__ import annotations

import pytest

from keel.proxy.trainer import TrainConfig, train_proxy


def _hex(values: list[float]) -> list[str]:
    return [v.hex() for v in values]


# (config, policy) → (training losses, validation loss)
PINNED_RUNS = {
    "bare": (
        TrainConfig(size="tiny", steps=5, eval_batches=1),
        None,
        [
            "0x1.66472c0000000p+2",
            "0x1.65d5520000000p+2",
            "0x1.634ffe0000000p+2",
            "0x1.60df960000000p+2",
            "0x1.5c03200000000p+2",
        ],
        "0x1.5a50320000000p+2",
    ),
    "observe_clip_z_loss": (
        TrainConfig(size="tiny", steps=5, lr=3e-2, z_loss=1e-4, max_grad_norm=1.0, eval_batches=1),
        "observe",
        [
            "0x1.6679d00000000p+2",
            "0x1.561d620000000p+2",
            "0x1.4902980000000p+2",
            "0x1.362f8a0000000p+2",
            "0x1.1bcac80000000p+2",
        ],
        "0x1.0868a80000000p+2",
    ),
    "recover_stabilized_independent_adamw": (
        TrainConfig(
            size="tiny",
            steps=4,
            stabilize=("qk_norm", "z_loss"),
            optimizer="independent_adamw",
            weight_decay=1e-4,
            eval_batches=1,
        ),
        "recover",
        ["0x1.6627b60000000p+2", "0x1.657ac20000000p+2", "0x1.62fb4c0000000p+2", "0x1.60951c0000000p+2"],
        "0x1.5d83a40000000p+2",
    ),
}


@pytest.mark.parametrize("name", sorted(PINNED_RUNS))
def test_train_proxy_losses_are_bit_identical_to_the_pinned_run(name, one_torch_thread):
    config, policy, losses, val_loss = PINNED_RUNS[name]
    run = train_proxy(config, policy=policy)
    assert _hex(run.losses) == losses
    assert run.val_loss.hex() == val_loss
