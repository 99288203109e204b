"""keel.watch on torchtune's ``recipes/lora_finetune_single_device.py`` ``train()`` loop (pytorch/torchtune @bd2a0fc),
built by hand at a tiny size: a frozen base with LoRA adapters on the attention's q and v projections, padded batches
of varying length (labels ``-100`` on the padding), and the recipe's gradient accumulation::

    current_num_tokens = (batch["labels"] != self._loss_fn.ignore_index).sum()
    num_tokens += current_num_tokens
    current_loss = self._loss_step(batch) * current_num_tokens
    running_loss += current_loss
    current_loss.backward()
    if (idx + 1) % self._gradient_accumulation_steps == 0:
        training.scale_grads(self._model, 1 / num_tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), max_norm=float(self._clip_grad_norm))
        self._optimizer.step(); self._optimizer.zero_grad(set_to_none=True); self._lr_scheduler.step()
        loss_to_log = running_loss.detach().item() / num_tokens

keel's line after the recipe's setup: ``guard = keel.watch(model, optimizer, lr_scheduler, policy=...)``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import keel
from keel.recover import RecoveryConfig

VOCAB, WIDTH, LENGTH, BATCH, ACCUMULATE, STEPS, GARBAGE_STEP = 32, 16, 12, 4, 2, 36, 30


class LoRALinear(nn.Module):
    """torchtune's LoRALinear: a frozen weight plus ``(alpha / rank) * B(A(x))``, B zero-initialised."""

    def __init__(self, size: int, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size, size) / math.sqrt(size), requires_grad=False)
        self.lora_a = nn.Linear(size, rank, bias=False)
        self.lora_b = nn.Linear(rank, size, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.scaling * self.lora_b(self.lora_a(x))


class TinyDecoder(nn.Module):
    """One causal self-attention block (LoRA on q and v, as torchtune's default lora_attn_modules) and an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.q_proj, self.k_proj, self.v_proj = LoRALinear(WIDTH), nn.Linear(WIDTH, WIDTH), LoRALinear(WIDTH)
        self.mlp = nn.Sequential(
            nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 2 * WIDTH), nn.SiLU(), nn.Linear(2 * WIDTH, WIDTH)
        )
        self.output = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        x = self.norm(h)
        h = h + F.scaled_dot_product_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), is_causal=True)
        return self.output(h + self.mlp(h))


def _batches(garbage_step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Arithmetic sequences of random length, right-padded; at ``garbage_step`` every micro-batch's labels are random
    tokens (a broken prompt template or collator: the text is fine, what it is trained to say is not)."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for index in range(STEPS * ACCUMULATE):
        tokens, labels = torch.zeros(BATCH, LENGTH, dtype=torch.long), torch.full((BATCH, LENGTH), -100)
        for row, length in enumerate(torch.randint(3, LENGTH + 1, (BATCH,), generator=g).tolist()):
            sequence = (torch.randint(0, VOCAB, (1,), generator=g) + 3 * torch.arange(length)) % VOCAB
            tokens[row, :length], labels[row, :length] = sequence, sequence
        if index // ACCUMULATE == garbage_step:
            labels = torch.where(labels == -100, labels, torch.randint(0, VOCAB, labels.shape, generator=g))
        batches.append((tokens, labels))
    return batches


def _train(policy: str | None, *, garbage_step: int = -1, weighted: bool = True, lr_x100_at: int = -1):
    """``weighted=False``: the recipe's earlier form, ``loss = loss / gradient_accumulation_steps``. ``lr_x100_at``:
    the schedule returns 100x its value at that one step (a warm-up formula with a bad factor)."""
    torch.manual_seed(0)
    model = TinyDecoder()
    for name, p in model.named_parameters():  # set_trainable_params(model, get_adapter_params(model))
        p.requires_grad = "lora_" in name
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.01)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(  # warm-up
        optimizer, lambda s: min(1.0, (s + 1) / 5) * (100 if s == lr_x100_at else 1)
    )
    guard = None
    if policy is not None:
        recovery = RecoveryConfig(snapshot_every=4, quiet_steps=0)
        guard = keel.watch(model, optimizer, lr_scheduler, policy=policy, recovery=recovery)
    logged: list[float] = []
    running_loss, num_tokens = torch.zeros(()), torch.zeros((), dtype=torch.long)
    try:
        for idx, (tokens, labels) in enumerate(_batches(garbage_step)):
            current_num_tokens = (labels != -100).sum()
            num_tokens += current_num_tokens
            loss = F.cross_entropy(model(tokens)[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
            current_loss = loss * current_num_tokens if weighted else loss / ACCUMULATE
            running_loss += current_loss.detach()
            current_loss.backward()
            if (idx + 1) % ACCUMULATE == 0:
                if weighted:
                    for p in model.parameters():  # training.scale_grads(model, 1 / num_tokens)
                        if p.grad is not None:
                            p.grad *= 1 / num_tokens
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr_scheduler.step()
                logged.append(running_loss.item() / num_tokens.item() if weighted else running_loss.item())
                running_loss, num_tokens = torch.zeros(()), torch.zeros((), dtype=torch.long)
    finally:
        if guard is not None:
            guard.close()
    return model, logged, guard


def _not_info(guard) -> list[tuple[int, str, str]]:
    return [(f.step, f.kind, f.severity) for f in guard.findings if f.severity != "info"]


def test_observe_is_bit_identical_to_the_bare_recipe_and_finds_nothing_in_a_healthy_run():
    bare, bare_logged, _ = _train(None)
    observed, logged, guard = _train("observe")
    assert guard is not None and not guard.decisions and _not_info(guard) == []
    assert logged == bare_logged
    assert all(torch.equal(a, b) for a, b in zip(bare.parameters(), observed.parameters(), strict=True))


def test_a_step_of_garbage_labels_is_named_at_its_per_token_loss():
    """h28 V: keel took the step's loss as the sum of what the recipe calls backward() on, ``loss * num_tokens``: the
    per-token loss times a token count that moves with the padding. The garbage step (per-token loss ×2.6) read
    417 → 1060 beside healthy steps of 370–661 and nothing was found; keel now divides by the counts."""
    _, logged, guard = _train("observe", garbage_step=GARBAGE_STEP)
    assert guard is not None
    spikes = [f for f in guard.findings if f.kind == "loss_spike" and f.severity == "critical"]
    assert [f.step for f in spikes] == [GARBAGE_STEP]
    assert spikes[0].value == pytest.approx(logged[GARBAGE_STEP], rel=1e-5)  # the recipe's own loss_to_log


def test_skip_leaves_the_garbage_step_out():
    _, _, guard = _train("skip", garbage_step=GARBAGE_STEP)
    assert guard is not None and [(d.step, d.action) for d in guard.decisions] == [(GARBAGE_STEP, "skip")]


def test_the_earlier_recipes_divided_loss_still_gives_the_steps_mean():
    """``loss / gradient_accumulation_steps`` (no count): the sum of the divided losses, the mean, as before."""
    _, logged, guard = _train("observe", garbage_step=GARBAGE_STEP, weighted=False)
    assert guard is not None
    spikes = [f for f in guard.findings if f.kind == "loss_spike" and f.severity == "critical"]
    assert [f.step for f in spikes] == [GARBAGE_STEP]
    assert spikes[0].value == pytest.approx(logged[GARBAGE_STEP], rel=1e-5)


def _product(factor: object, *, reverse: bool = False) -> torch.Tensor:
    loss = (torch.ones(2, requires_grad=True) * 2.0).mean()
    return factor * loss if reverse else loss * factor  # type: ignore[operator]


@pytest.mark.parametrize(
    ("factor", "reverse", "count"),
    [
        (torch.tensor(7), False, 7),  # torchtune's loss * current_num_tokens
        (torch.tensor(7), True, 7),  # current_num_tokens * loss
        (torch.tensor([1, 0, 1]).sum(), False, 2),  # (labels != ignore_index).sum()
        (torch.tensor(7, dtype=torch.int32), False, 7),
        (torch.tensor(0), False, 0),  # a micro-batch all padding
        (torch.tensor(0.5), False, None),  # a float weight (a loss coefficient, a GradScaler's scale): no count
        (torch.tensor(True), False, None),
        (torch.tensor([2, 3]), False, None),  # not a 0-d factor: the product is no scalar loss either
    ],
)
def test_the_count_a_loss_was_multiplied_by(factor: torch.Tensor, reverse: bool, count: int | None):
    from keel.integrations.watch import _count_factor

    found = _count_factor(_product(factor, reverse=reverse))
    assert (None if found is None else int(found)) == count


def test_a_step_whose_counts_are_all_zero_is_the_sum_not_zero_over_zero():
    from keel.integrations._loss import StepLoss

    meter = StepLoss()
    meter.add(torch.tensor(0.0), share=True, count=torch.tensor(0))
    meter.add(torch.tensor(0.0), share=True, count=torch.tensor(0))
    assert torch.isfinite(meter.take())  # type: ignore[arg-type]
    meter.add(torch.tensor(6.0), share=True, count=torch.tensor(2))
    meter.add(torch.tensor(4.0), share=True)  # one share without a count: the plain sum, as before
    assert meter.take() == 10.0


def test_a_schedule_at_100x_for_one_step_costs_one_skipped_update():
    """h28 V: the skipped update's scheduler call was withheld, so the LambdaLR kept its x100 value: refused three
    times, then taken as the loop's own and applied (the bare run's damage, three updates later), and skip aborted at
    the 11th skip in a row (60-step run). A skip for an LR surge lets the call through: the schedule's next value
    replaces the surged one."""
    _, clean, _ = _train(None)
    model, logged, guard = _train("skip", lr_x100_at=20)
    assert guard is not None and [(d.step, d.action) for d in guard.decisions] == [(20, "skip")]
    assert logged[-1] == pytest.approx(clean[-1], rel=0.1)


@given(
    shares=st.lists(
        st.tuples(st.floats(0, 50, allow_nan=False), st.integers(0, 4096)),
        min_size=1,
        max_size=8,
    )
)
@settings(max_examples=60, deadline=None)
def test_the_steps_loss_is_the_count_weighted_mean_of_its_micro_batches(shares: list[tuple[float, int]]):
    """What torchtune logs, ``running_loss / num_tokens``, for any per-token losses and token counts; the plain sum
    when every count is 0 (never 0/0)."""
    from keel.integrations._loss import StepLoss

    meter = StepLoss()
    for loss, count in shares:
        meter.add(torch.tensor(loss * count, dtype=torch.float64).float(), share=True, count=torch.tensor(count))
    taken = meter.take()
    assert taken is not None and torch.isfinite(taken)
    total = sum(count for _, count in shares)
    expected = sum(loss * count for loss, count in shares) / total if total else 0.0
    assert float(taken) == pytest.approx(expected, rel=1e-5, abs=1e-4)
