"""Writes the sample logs in this folder: `python tests/doctor/data/tools/make_tool_logs.py` (deterministic).

Each is written from its tool's own output code or documentation (README.md here names the source file), not from
keel's writers: a healthy run, and the same run with one bad update (loss and gradient norm jump at SPIKE_STEP).
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

HERE = Path(__file__).parent
STEPS = 50
SPIKE_STEP = 40
ANSI_CYAN, ANSI_RESET = "\x1b[36m", "\x1b[0m"


def _curve(seed: int, spike: bool) -> list[tuple[int, float, float, float]]:
    """(step, loss, grad norm, lr) of a pretraining-like run: warm-up, a decaying loss with batch noise."""
    rng = random.Random(seed)
    rows = []
    for step in range(1, STEPS + 1):
        loss = 2.0 + 3.0 * math.exp(-step / 15) + rng.gauss(0, 0.02)
        grad = abs(rng.gauss(0.6, 0.05))
        if spike and step == SPIKE_STEP:
            loss, grad = loss * 3, 60.0
        rows.append((step, loss, grad, 3e-4 * min(1.0, step / 10)))
    return rows


def verl_ppo(spike: bool) -> str:
    """verl/utils/logger/aggregate_logger.py: LocalLogger.log prints concat_dict_to_str(data, step) — "step:N" and
    each numeric metric "name:pprint.pformat(v)" joined by " - " (numpy 2 scalars print as np.float64(...)); the
    PPO trainer runs in Ray's TaskRunner actor, whose stdout Ray prefixes with "(TaskRunner pid=N)" in colour."""
    rng = random.Random(7)
    lines = [
        "2025-11-03 10:00:01,123\tINFO worker.py:1888 -- Started a local Ray instance.",
        f"{ANSI_CYAN}(TaskRunner pid=2397){ANSI_RESET} [validate_config] All configuration checks passed successfully!",
        f"{ANSI_CYAN}(TaskRunner pid=2397){ANSI_RESET} step:0 - val-core/openai/gsm8k/reward/mean@1:np.float64(0.12)",
    ]
    for step in range(1, STEPS + 1):
        pg_loss, grad = rng.gauss(0, 0.01), abs(rng.gauss(0.25, 0.05))
        if spike and step == SPIKE_STEP:
            pg_loss, grad = 1.8, 45.0
        metrics = {
            "training/global_step": str(step),
            "training/epoch": "0",
            "actor/entropy": f"np.float64({0.55 - 0.1 * step / STEPS + rng.gauss(0, 0.02)!r})",
            "actor/kl_loss": f"np.float64({0.001 + 0.003 * step / STEPS + abs(rng.gauss(0, 3e-4))!r})",
            "actor/pg_loss": f"np.float64({pg_loss!r})",
            "actor/pg_clipfrac": f"np.float64({abs(rng.gauss(0.002, 0.001))!r})",
            "actor/grad_norm": f"np.float64({grad!r})",
            "actor/lr": "1e-06",
            "critic/score/mean": f"np.float64({0.2 + 0.4 * step / STEPS + rng.gauss(0, 0.03)!r})",
            "response_length/mean": f"np.float64({310 - 40 * step / STEPS + rng.gauss(0, 12)!r})",
            "response_length/clip_ratio": f"np.float64({abs(rng.gauss(0.01, 0.004))!r})",
        }
        if step % 25 == 0:
            metrics["val-core/openai/gsm8k/reward/mean@1"] = f"np.float64({0.12 + 0.5 * step / STEPS!r})"
        body = " - ".join([f"step:{step}", *(f"{name}:{value}" for name, value in metrics.items())])
        lines.append(f"{ANSI_CYAN}(TaskRunner pid=2397){ANSI_RESET} {body}")
    return "\n".join(lines) + "\n"


def verl_sft(spike: bool) -> str:
    """verl/trainer/fsdp_sft_trainer.py: training_step returns {"train/loss", "train/lr(1e-3)"} (the LR × 1000),
    printed by the same LocalLogger (a plain float prints as repr)."""
    lines = ["Total training steps: 50"]
    for step, loss, _grad, lr in _curve(3, spike):
        lines.append(f"step:{step} - train/loss:{loss!r} - train/lr(1e-3):{lr * 1e3!r}")
    return "\n".join(lines) + "\n"


def _human(value: float) -> str:
    """nanotron/logging.py human_format: 3 significant digits, K/M/G... for thousands, millions..."""
    if abs(value) < 1:
        return f"{value:.3g}"
    value, magnitude = float(f"{value:.3g}"), 0
    while abs(value) >= 1000 and magnitude < 6:
        value, magnitude = value / 1000.0, magnitude + 1
    return f"{value:f}".rstrip("0").rstrip(".") + ["", "K", "M", "G", "T", "P", "E"][magnitude]


def nanotron(spike: bool) -> str:
    """nanotron/logging.py: LoggerWriter.add_scalars_from_list joins "iteration: N / TOTAL" and "tag: value" by
    " | " (trainer.py's log_entries, each in human_format), after set_logger_verbosity_format's dim-italic ANSI
    header "%m/%d %H:%M:%S [INFO|DP=0|PP=0|TP=0]: "."""
    lines = ["\x1b[2;3m11/03 10:00:00 [INFO|DP=0|PP=0|TP=0]\x1b[0m: Config: ..."]
    for step, loss, grad, lr in _curve(5, spike):
        grad = 1500.0 if spike and step == SPIKE_STEP else grad  # human_format writes it "1.5K"
        fields = [
            f"iteration: {step} / {STEPS}",
            f"consumed_tokens: {_human(step * 262144)}",
            f"elapsed_time_per_iteration_ms: {_human(1210.5)}",
            f"tokens_per_sec: {_human(216600)}",
            f"global_batch_size: {_human(128)}",
            f"lm_loss: {_human(loss)}",
            f"lr: {_human(lr)}",
            f"model_tflops_per_gpu: {_human(121.3)}",
            f"grad_norm: {_human(grad)}",
        ]
        lines.append(
            f"\x1b[2;3m11/03 10:{step // 60:02d}:{step % 60:02d} [INFO|DP=0|PP=0|TP=0]\x1b[0m: " + " | ".join(fields)
        )
    return "\n".join(lines) + "\n"


def maxtext(spike: bool) -> str:
    """MaxText's metric_logger (docs/guides/monitoring_and_debugging/understand_logs_and_metrics.md):
    "completed step: N, seconds: %.3f, TFLOP/s/device: %.3f, Tokens/s/device: %.3f, total_weights: N, loss: %.3f"."""
    lines = ["Config param steps: 50", "Num_devices: 4, shape (1, 1, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1)"]
    for step, loss, _grad, _lr in _curve(9, spike):
        lines.append(
            f"completed step: {step - 1}, seconds: 5.667, TFLOP/s/device: 134.924, Tokens/s/device: 8672.758, "
            f"total_weights: 196608, loss: {loss:.3f}"
        )
    return "\n".join(lines) + "\n"


def keras(spike: bool) -> str:
    """keras/src/callbacks/csv_logger.py: CSVLogger writes "epoch" then the logs' keys sorted, one row per epoch."""
    lines = ["epoch,accuracy,learning_rate,loss,val_accuracy,val_loss"]
    for step, loss, _grad, lr in _curve(11, spike):
        lines.append(f"{step - 1},{0.5 + step / 200:.4f},{lr!r},{loss!r},{0.5 + step / 210:.4f},{loss * 1.04!r}")
    return "\n".join(lines) + "\n"


def wandb_chart(spike: bool) -> str:
    """W&B's web UI, a line chart's "Export panel data" → CSV: the x axis, then per run "<run> - <metric>" and its
    "__MIN" / "__MAX" (wandb/wandb#5349, #6474), every cell quoted."""
    run = "glamorous-sun-5"
    lines = [f'"Step","{run} - train/loss","{run} - train/loss__MIN","{run} - train/loss__MAX"']
    for step, loss, _grad, _lr in _curve(13, spike):
        lines.append(f'"{step}","{loss!r}","{loss!r}","{loss!r}"')
    return "\n".join(lines) + "\n"


def openrlhf_sft(spike: bool) -> str:
    """openrlhf/trainer/sft_trainer.py: step_bar = tqdm(range(steps), desc=f"Train step of epoch {epoch}"), then per
    step step_bar.set_postfix(logs_dict) ({"gpt_loss", "lr", "grad_norm", "ppl"}) and step_bar.update() — drawn by
    tqdm itself (each redraw after a "\r" in a file; mininterval=0: a training step takes longer than tqdm's 0.1 s).
    Two epochs of 25 steps; DeepSpeed's start-up line first."""
    from tqdm import tqdm  # noqa: PLC0415  (only this writer needs it)

    out = io.StringIO()
    out.write("[2025-11-03 10:00:00,000] [INFO] [real_accelerator.py:203:get_accelerator] Setting ds_accelerator\n")
    curve = _curve(17, spike)
    per_epoch = STEPS // 2
    for epoch in range(2):
        bar = tqdm(range(per_epoch), desc=f"Train step of epoch {epoch}", file=out, mininterval=0, ncols=140)
        for _step, loss, grad, lr in curve[epoch * per_epoch : (epoch + 1) * per_epoch]:
            bar.set_postfix({"gpt_loss": loss, "lr": lr, "grad_norm": grad, "ppl": math.exp(min(loss, 20.0))})
            bar.update()
        bar.close()
    return out.getvalue()


WRITERS = {
    "openrlhf_sft_{}.log": openrlhf_sft,
    "verl_ppo_{}.log": verl_ppo,
    "verl_sft_{}.log": verl_sft,
    "nanotron_{}.log": nanotron,
    "maxtext_{}.log": maxtext,
    "keras_csvlogger_{}.csv": keras,
    "wandb_chart_export_{}.csv": wandb_chart,
}

if __name__ == "__main__":
    for pattern, write in WRITERS.items():
        for kind in ("healthy", "spiky"):
            (HERE / pattern.format(kind)).write_text(write(kind == "spiky"))
