"""The fine-tune scenarios' pieces (fast) and the runs themselves (slow): heterogeneous snippets, epochs,
LoRA on a 4-bit base — and a loss that is noisy, falls at epoch boundaries and ends low."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from keel.harness.scenarios import _finetune, create_scenario
from keel.harness.scenarios._finetune import IGNORE, SEQ_LEN, Epochs, LoRALinear, apply_lora, round_to_bits, snippets
from keel.proxy.model import create_proxy_model


def test_snippets_are_short_and_long_easy_and_hard():
    x, y = snippets(0, 16)
    lengths = (y != IGNORE).sum(dim=1).tolist()
    assert sorted(set(lengths)) == [SEQ_LEN // 4, SEQ_LEN]
    assert lengths.count(SEQ_LEN) == 8
    inside = y[:, 1:] != IGNORE  # positions whose next byte is also in the example
    assert bool((x[:, 1:][inside] == y[:, :-1][inside]).all())  # the targets are the next bytes
    ratio = [len(zlib.compress(bytes(x[i, : lengths[i]].tolist()), 9)) / lengths[i] for i in range(16)]
    easy, hard = ratio[0::2], ratio[1::2]  # they alternate
    assert np.mean(easy) < np.mean(hard)
    assert torch.equal(snippets(0, 16)[0], x) and not torch.equal(snippets(1, 16)[0], x)


def test_epochs_show_every_example_once_per_epoch_in_a_new_order():
    x, y = snippets(0, 8)
    epochs = Epochs(x, y, batch_size=2, seed=0)
    seen = [[tuple(row.tolist()) for row in epochs(step, None)[0]] for step in range(8)]
    first, second = sum(seen[:4], []), sum(seen[4:], [])
    assert sorted(first) == sorted(second) == sorted(tuple(row.tolist()) for row in x)
    assert first != second
    with pytest.raises(ValueError, match="batch_size=3"):
        Epochs(x, y, batch_size=3, seed=0)


def test_round_to_bits_uses_sixteen_levels_per_block():
    w = torch.randn(8, 64)
    q = round_to_bits(w, bits=4, block=64)
    for row, qrow in zip(w, q, strict=True):
        assert len(torch.unique(qrow)) <= 16
        assert (qrow - row).abs().max() <= row.abs().max() / 7 / 2 + 1e-6  # half a step of the absmax grid


def test_lora_starts_at_the_base_and_trains_only_the_adapters():
    torch.manual_seed(0)
    model = create_proxy_model("tiny")
    idx = torch.randint(0, 256, (2, 16))
    before = model(idx)
    apply_lora(model, rank=4, alpha=8.0, bits=None, seed=0)
    assert torch.allclose(model(idx), before)  # B = 0: the adapted model is the base model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * len(model.blocks)
    quantized = apply_lora(create_proxy_model("tiny"), rank=4, alpha=8.0, bits=4, seed=0)
    assert len(torch.unique(quantized.blocks[0].attn.qkv.base.weight[0, :64])) <= 16


def test_pretrained_base_leaves_the_global_rng_as_it_was(monkeypatch):
    monkeypatch.setattr(_finetune, "BASE_STEPS", 2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    state = _finetune.pretrained_base.__wrapped__(0)
    assert torch.equal(torch.rand(3), expected)
    assert set(state) == set(create_proxy_model("tiny").state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qlora_finetune", "full_finetune"])
def test_fine_tune_is_noisy_falls_at_epoch_boundaries_and_ends_low_without_an_alarm(name):
    result = create_scenario(name).run()
    losses = np.array(result.losses)
    per_epoch = len(losses) // {"qlora_finetune": 30, "full_finetune": 16}[name]
    epoch_medians = np.median(losses.reshape(-1, per_epoch), axis=1)
    assert epoch_medians[-1] < 0.2 * epoch_medians[0] and epoch_medians[-1] < 0.3  # it memorised its data
    assert np.mean(np.diff(epoch_medians) < 0) >= 0.7  # mostly a new low each epoch
    step_noise = np.median(np.abs(np.diff(np.log(losses[-3 * per_epoch :])))) * 1.4826 / math.sqrt(2)
    assert step_noise >= 0.2  # per-step swings of ±20 % and more to the end
    assert result.alarms() == [], [(f.step, f.kind, f.severity, f.evidence) for f in result.alarms()]
