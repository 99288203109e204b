"""keel on pytorch/examples' word_language_model/main.py: an LSTM LM updated by hand, with no optimizer
(``p.data.add_(p.grad, alpha=-lr)`` after ``clip_grad_norm_``), its LR divided by 4 when the validation loss does
not improve. keel acts at an optimizer's step(), so the loop takes ``torch.optim.SGD`` for its hand-written update
(the same arithmetic, checked here bit for bit) and writes its LR into ``param_groups``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import keel
from keel.store import RunReader

BPTT, BATCH, CLIP = 8, 4, 0.25
TEXT = (torch.__doc__ or "") + (nn.Module.__doc__ or "")  # Python source text, as bytes: a tiny corpus


class RNNModel(nn.Module):
    """word_language_model's model: embedding, LSTM, decoder, log-softmax; returns (output, hidden)."""

    def __init__(self, vocab: int = 256, size: int = 16) -> None:
        super().__init__()
        self.encoder, self.rnn, self.decoder = nn.Embedding(vocab, size), nn.LSTM(size, size), nn.Linear(size, vocab)

    def forward(self, tokens: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        output, hidden = self.rnn(self.encoder(tokens), hidden)
        return torch.log_softmax(self.decoder(output), dim=-1).view(-1, 256), hidden

    def init_hidden(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1, BATCH, 16), torch.zeros(1, BATCH, 16)


def _batchify(data: torch.Tensor) -> torch.Tensor:
    rows = data.size(0) // BATCH
    return data[: rows * BATCH].view(BATCH, -1).t().contiguous()


def _train(update: str, *, policy: str | None = None, run_dir=None, nan_at: int = -1, epochs: int = 5):
    """main.py's train() + its epoch loop; ``update`` is "by hand" (the example's) or "sgd" (torch.optim.SGD)."""
    torch.manual_seed(0)
    tokens = torch.tensor(list(TEXT.encode()[:1200]), dtype=torch.long)
    train_data, val_data = _batchify(tokens[:1000]), _batchify(tokens[1000:])
    model, criterion, lr = RNNModel(), nn.NLLLoss(), 20.0
    opt = torch.optim.SGD(model.parameters(), lr=lr) if update == "sgd" else None
    watch = keel.watch(model, opt, policy=policy, run_dir=run_dir) if policy else None
    best_val, step = None, 0
    for _ in range(epochs):
        model.train()
        hidden = model.init_hidden()
        for i in range(0, min(train_data.size(0) - 1, 10 * BPTT), BPTT):
            data, targets = train_data[i : i + BPTT], train_data[i + 1 : i + 1 + BPTT].reshape(-1)
            model.zero_grad()
            hidden = tuple(h.detach() for h in hidden)
            output, hidden = model(data, hidden)
            loss = criterion(output, targets) * (float("nan") if step == nan_at else 1.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            if opt is None:
                for p in model.parameters():
                    p.data.add_(p.grad, alpha=-lr)
            else:
                opt.step()
            step += 1
        model.eval()
        with torch.no_grad():
            output, _ = model(val_data[:-1], model.init_hidden())
            val_loss = criterion(output, val_data[1:].reshape(-1)).item()
        if best_val is None or val_loss < best_val:
            best_val = val_loss
        else:
            lr /= 4.0
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = lr
    if watch is not None:
        watch.close()
    return [p.detach().clone() for p in model.parameters()], lr


def test_watch_without_an_optimizer_names_the_sgd_that_makes_the_same_update():
    with pytest.raises(ValueError, match=r"optimizer=None.*torch\.optim\.SGD\(model\.parameters\(\), lr=lr\)"):
        keel.watch(RNNModel(), None)


def test_torch_sgd_is_bit_for_bit_the_examples_update_by_hand_lr_drops_included():
    by_hand, lr_by_hand = _train("by hand")
    with_sgd, lr_sgd = _train("sgd")
    assert lr_by_hand == lr_sgd < 20.0  # the validation loss plateaued at least once: the LR / 4 was exercised
    assert all(torch.equal(p, q) for p, q in zip(by_hand, with_sgd, strict=True))


def test_watched_the_loop_skips_a_nan_batch_and_keeps_the_lr_the_loop_writes(tmp_path):
    params, lr = _train("sgd", policy="skip", run_dir=tmp_path, nan_at=12)
    assert all(p.isfinite().all() for p in params)
    run = RunReader(tmp_path)
    try:
        assert [(d.step, d.action) for d in run.decisions()] == [(12, "skip")]
        steps, lrs = run.signal("lr")
        assert lrs[0] == 20.0 and lrs[-1] == lr  # the loop's LR / 4, as the loop wrote it
    finally:
        run.close()
