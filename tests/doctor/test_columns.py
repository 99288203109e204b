import pytest

from keel.doctor.columns import find_step_column, map_columns, normalize


@pytest.mark.parametrize(
    "raw,key",
    [
        ("grad_norm", "grad/norm"),
        ("gradient_norm", "grad/norm"),
        ("grad-norm", "grad/norm"),
        ("Grad Norm", "grad/norm"),
        ("train/grad_norm", "grad/norm"),
        ("loss", "loss"),
        ("train_loss", "loss"),
        ("lm loss", "loss"),
        ("train/loss", "loss"),
        ("learning_rate", "lr"),
        ("train/learning_rate", "lr"),
        ("loss_scale", "amp/scale"),
        ("eval_loss", "val/loss"),
        ("val_loss", "val/loss"),
        ("step_time_s", "time/step"),
    ],
)
def test_common_names_map_to_keel_keys(raw, key):
    assert map_columns([raw])[raw] == key


def test_unknown_columns_keep_their_names():
    assert map_columns(["tflops", "attn/max_logit/0", "epoch"]) == {
        "tflops": "tflops",
        "attn/max_logit/0": "attn/max_logit/0",
        "epoch": "epoch",
    }


def test_a_key_is_claimed_once_by_preference_and_a_keel_named_column_wins():
    assert map_columns(["train_loss", "loss"]) == {"train_loss": "train_loss", "loss": "loss"}
    assert map_columns(["gradient_norm", "grad_norm"]) == {"gradient_norm": "gradient_norm", "grad_norm": "grad/norm"}
    assert map_columns(["grad_norm", "grad/norm"]) == {"grad_norm": "grad_norm", "grad/norm": "grad/norm"}


def test_step_column_preference_and_absence():
    assert find_step_column(["loss", "Iteration", "global_step"]) == "global_step"
    assert find_step_column(["_step", "loss"]) == "_step"
    assert find_step_column(["loss", "epoch"]) is None
    assert normalize("  Elapsed-Time (ms) ") == "elapsed_time_ms"
