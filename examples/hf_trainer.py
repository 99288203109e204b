"""keel inside the Hugging Face Trainer: one callback.

    python examples/hf_trainer.py --steps 40 --inject-nan 20 --out runs/hf

A tiny GPT-2 built from a config (nothing is downloaded) trains on random tokens with gradient accumulation
and a linear schedule. ``--inject-nan STEP`` makes the forward pass produce a NaN loss at that step. The
Trainer's ``logging_nan_inf_filter`` (on by default) hides it from the Trainer's own logs; keel sees it,
skips the update, and records it in ``--out``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from keel.integrations.hf import KeelCallback


class InjectNaN(TrainerCallback):
    """Makes the embedding output NaN during one optimizer step (a stand-in for a real overflow)."""

    def __init__(self, step: int | None) -> None:
        self.step, self.current = step, -1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.transformer.wte.register_forward_hook(
            lambda module, inputs, out: out * float("nan") if self.current == self.step else out
        )

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = state.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--inject-nan", type=int, default=None, metavar="STEP")
    parser.add_argument("--out", default="runs/hf")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2))
    tokens = torch.randint(0, 128, (512, 32), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    training_args = TrainingArguments(
        output_dir=f"{args.out}/trainer",
        max_steps=args.steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=5,
        logging_steps=5,
        report_to=[],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        disable_tqdm=True,
    )
    keel_callback = KeelCallback(run_dir=args.out, policy="skip", overwrite=True)  # a new run each time
    trainer = Trainer(
        model=model, args=training_args, train_dataset=dataset, callbacks=[InjectNaN(args.inject_nan), keel_callback]
    )
    trainer.train()
    for decision in keel_callback.guard.decisions:
        print(f"step {decision.step}: {decision.action} — {decision.reason}")
    print(f"run store: {args.out}/run.sqlite")


if __name__ == "__main__":
    main()
