"""Which data did it: keel names the example behind a spike, skip-lists it, and tells data from a transient fault.

    python examples/data_attribution.py

A small classifier trains on 640 examples; example 486 is poisoned (its input scaled 300×) and step 24's gradient is
corrupted after backward (a stand-in for a hardware fault). The loop hands keel each step's example ids and batch;
keel attributes the spike at step 30 to example 486, writes it to ``run_dir/skip_list.json``, replays step 24 and
finds it does not reproduce (transient: skipped, nothing skip-listed). A second epoch through `SkipListSampler`
never draws example 486 again.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import keel
from keel.recover import RecoveryConfig

N, BATCH, POISONED, FAULTY_STEP = 640, 16, 486, 24


def per_example_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The loop's loss, one value per example (the loop's loss is their mean)."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(N, 8)
    y = x[:, :4].argmax(1)
    x[POISONED] *= 300.0
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    run_dir = Path(tempfile.mkdtemp(prefix="keel-data-"))
    sampler = keel.SkipListSampler(torch.utils.data.SequentialSampler(range(N)), run_dir)
    guard = keel.Guard(
        model,
        optimizer,
        run_dir=str(run_dir),
        policy="skip",
        attribution=keel.Attribution(loss_fn=per_example_loss),
        recovery=RecoveryConfig(replay=True),
    )
    seen_poisoned = []
    for epoch in range(2):
        order = list(sampler)  # the skip list is read again each epoch
        for start in range(0, len(order), BATCH):
            ids = order[start : start + BATCH]
            batch = (x[ids], y[ids])
            loss = per_example_loss(model, batch).mean()
            loss.backward()
            if epoch == 0 and start // BATCH == FAULTY_STEP:
                for p in model.parameters():
                    p.grad.mul_(1e4)  # type: ignore[union-attr]  # a fault in this computation, not in the data
            guard.step(loss, batch_ids=ids, batch=batch)
            optimizer.zero_grad(set_to_none=True)
            seen_poisoned += [(epoch, start // BATCH)] if POISONED in ids else []
    guard.close()
    for decision in guard.decisions:
        print(f"step {decision.step}: {decision.action} — {decision.reason[:110]}")
    print("skip list:", json.dumps(json.loads((run_dir / "skip_list.json").read_text())["entries"]))
    print("epochs/steps that drew the poisoned example:", seen_poisoned)


if __name__ == "__main__":
    main()
