"""keel inside TRL's DPOTrainer: one call, `guard_trainer(trainer, ...)`.

    python examples/trl_dpo.py --steps 30 --inject-nan 20 --out runs/trl_dpo

A tiny Qwen2 built from a config, with one token per character (nothing is downloaded), learns preferences over
real text: lines of the Python standard library's own source (keel's proxy corpus). Each prompt is the start of a
line; the chosen answer is how that line goes on, the rejected one how another line goes on. keel records DPO's
own loss and TRL's statistics each step (chosen/rejected log-probabilities and rewards, margin, accuracy) and, with
``--inject-nan STEP`` (a NaN forward pass at that step), skips the poisoned update. It prints what it found, and
how the chosen answers' log-probability and the margin moved: DPO widens the margin, and may do it by lowering
the chosen answers' likelihood too (likelihood displacement, Razin et al. 2025).
"""

from __future__ import annotations

import argparse
import copy

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback
from trl import DPOConfig, DPOTrainer

from keel._core import keys
from keel.integrations.trl import guard_trainer
from keel.proxy.corpus import load_corpus
from keel.store import RunReader


def preference_pairs(n: int, prompt_chars: int = 16, answer_chars: int = 16) -> dict[str, list[str]]:
    """``n`` (prompt, chosen, rejected) triples cut from printable lines of the proxy corpus."""
    text = bytes(load_corpus(max_bytes=400_000)).decode("ascii", errors="ignore")
    width = prompt_chars + answer_chars
    lines = [line.strip() for line in text.splitlines()]
    lines = [line[:width] for line in lines if len(line) >= width and line.isprintable()][:n]
    return {
        "prompt": [line[:prompt_chars] for line in lines],
        "chosen": [line[prompt_chars:] for line in lines],
        "rejected": [lines[(i + 1) % len(lines)][prompt_chars:] for i in range(len(lines))],
    }


def char_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """One token per character seen in ``texts``, plus pad, eos and unk."""
    alphabet = sorted(set("".join(texts)))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


class InjectNaN(TrainerCallback):
    """Makes the policy's embedding output NaN during one optimizer step (a stand-in for a real overflow)."""

    def __init__(self, model: torch.nn.Module, step: int | None) -> None:
        self.step, self.current = step, -1
        model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, out: out * float("nan") if self.current == self.step else out
        )

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = state.global_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--inject-nan", type=int, default=None, metavar="STEP")
    parser.add_argument("--out", default="runs/trl_dpo")
    args = parser.parse_args(argv)

    pairs = preference_pairs(256)
    tok = char_tokenizer(pairs["prompt"] + pairs["chosen"] + pairs["rejected"])
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    dpo_args = DPOConfig(
        output_dir=f"{args.out}/trainer",
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=args.lr,
        beta=0.1,
        logging_steps=10,
        bf16=False,  # TRL turns bf16 and gradient checkpointing on by default, even on a CPU
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=dpo_args,
        train_dataset=Dataset.from_dict(pairs),
        processing_class=tok,
        callbacks=[InjectNaN(model, args.inject_nan)],
    )
    keel = guard_trainer(trainer, run_dir=args.out, policy="skip", overwrite=True)  # a new run each time
    trainer.train()

    for decision in keel.guard.decisions:
        print(f"step {decision.step}: {decision.action} — {decision.reason}")
    for finding in keel.guard.findings:
        print(f"step {finding.step}: {finding.severity} {finding.kind} on {finding.signal}")
    with RunReader(args.out) as run:
        for key in (keys.LOSS, keys.PREF_CHOSEN_LOGP, keys.PREF_MARGIN, keys.PREF_ACCURACY):
            steps, values = run.signal(key)
            finite = [(s, v) for s, v in zip(steps.tolist(), values.tolist(), strict=True) if v == v]
            if not finite:
                print(f"{key:>18}: no finite value")
                continue
            (s0, first), (s1, last) = finite[0], finite[-1]
            print(f"{key:>18}: {first:9.4f} at step {s0} → {last:9.4f} at step {s1}")
    print(f"run store: {args.out}/run.sqlite (keel report {args.out})")


if __name__ == "__main__":
    main()
