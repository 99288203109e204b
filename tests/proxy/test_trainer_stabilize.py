"""TrainConfig.stabilize: the proxy trainer's keel.stabilize path, checked against its built-in flags."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from keel.proxy.trainer import TrainConfig, train_proxy


def test_stabilize_path_trains_what_the_built_in_flags_train() -> None:
    # Surgery on the built model (LayerNorm q/k slots, z-loss hook on the head) must compute what building the
    # model with qk_norm=True and adding keel.losses.z_loss does: same init, same losses step by step.
    base = TrainConfig(size="tiny", steps=8, lr=3e-2, warmup=2, eval_batches=1)
    surgery = train_proxy(replace(base, stabilize=("qk_norm", "z_loss")))
    built_in = train_proxy(replace(base, qk_norm=True, z_loss=1e-4))
    qk_only = train_proxy(replace(base, qk_norm=True))
    plain = train_proxy(base)
    assert surgery.losses == pytest.approx(built_in.losses, rel=1e-5, abs=1e-6)
    assert surgery.val_loss == pytest.approx(built_in.val_loss, rel=1e-5)
    # Neither stabilizer is a no-op: the z-loss term (1e-4 · log Z², log Z ≈ ln 256) is in the loss from step 0,
    # and QK-norm changes the function itself.
    z_term = 1e-4 * math.log(256) ** 2
    assert 0.5 * z_term < surgery.losses[0] - qk_only.losses[0] < 2 * z_term
    assert abs(qk_only.losses[0] - plain.losses[0]) > 1e-4
    assert all(math.isfinite(v) for v in surgery.losses)


def test_stabilize_is_recorded_in_the_run_store(tmp_path) -> None:
    from keel.store import RunReader

    config = TrainConfig(size="tiny", steps=2, warmup=1, eval_batches=1, stabilize=["qk_norm"])
    assert config.stabilize == ("qk_norm",)
    train_proxy(config, policy="observe", run_dir=str(tmp_path))
    with RunReader(tmp_path) as reader:
        assert reader.meta()["config"]["stabilize"] == ["qk_norm"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stabilize": ("qk-norm",)}, r"TrainConfig.stabilize=\('qk-norm',\); allowed: names from .*qk_norm"),
        ({"stabilize": ("qk_norm",), "qk_norm": True}, "qk_norm=True; allowed: 'qk_norm' in one of the two"),
        ({"stabilize": ("z_loss",), "z_loss": 1e-4}, "z_loss=0.0001; allowed: 'z_loss' in one of the two"),
    ],
)
def test_bad_stabilize_values_raise_naming_the_field(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)
