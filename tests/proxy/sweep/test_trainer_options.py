"""The two TrainConfig fields the sweep added to the proxy trainer: ``z_loss`` and ``optimizer``."""

import pytest
import torch
import torch.nn.functional as F

from keel.losses import z_loss
from keel.optim import IndependentAdamW
from keel.proxy import ProxyBatches, create_proxy_model
from keel.proxy.trainer import TrainConfig, _create_optimizer, train_proxy

SMALL = dict(size="tiny", steps=2, batch_size=4, seq_len=16, warmup=1, eval_batches=1)


def test_z_loss_adds_exactly_the_z_loss_term_to_the_first_step():
    plain = train_proxy(TrainConfig(**SMALL), policy=None)
    with_z = train_proxy(TrainConfig(**SMALL, z_loss=1e-2), policy=None)
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16)
    x, y = ProxyBatches(batch_size=4, seq_len=16, seed=0).next()
    logits = model(x)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert plain.losses[0] == pytest.approx(ce, abs=1e-6)
    assert with_z.losses[0] == pytest.approx(ce + z_loss(logits, coefficient=1e-2).item(), abs=1e-6)
    assert with_z.losses[1] != plain.losses[1]  # the extra gradient changed the update


def test_optimizer_choice_and_default():
    model = create_proxy_model("tiny", seq_len=16)
    default = _create_optimizer(model, TrainConfig(**SMALL))
    assert type(default) is torch.optim.AdamW and default.defaults["betas"] == (0.9, 0.95)
    independent = _create_optimizer(model, TrainConfig(**SMALL, optimizer="independent_adamw", weight_decay=0.05))
    assert isinstance(independent, IndependentAdamW)
    assert independent.param_groups[0]["independent_weight_decay"] == 0.05


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("optimizer", "sgd", "TrainConfig.optimizer='sgd'; allowed: adamw, "),
        ("z_loss", -1.0, "TrainConfig.z_loss=-1.0; allowed: a finite number >= 0"),
        ("z_loss", float("nan"), "TrainConfig.z_loss=nan"),
    ],
)
def test_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})
