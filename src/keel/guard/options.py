"""The checks of `Guard`'s arguments: each bad value is one ValueError naming the argument, the value and what is
allowed, raised before anything is created, opened or hooked.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from keel.guard.distributed import DistributedConfig
from keel.recover import POLICIES, RecoveryConfig
from keel.signals import Probe
from keel.signals.attribution import Attribution


def check_run_dir(run_dir: object) -> str | None:
    """``run_dir`` as a str, created if needed; ValueError when it is no folder keel can write in."""
    _check_run_dir(run_dir, {})
    if run_dir is None:
        return None
    path = os.fspath(run_dir)  # type: ignore[call-overload]
    if not path or "\x00" in path:
        raise ValueError(f"run_dir={path!r}; allowed: None or a folder path (not empty, no NUL character)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"run_dir={path!r} is a file; allowed: a folder (keel writes run.sqlite and snapshots in it)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"run_dir={path!r} cannot be created ({exc.strerror or exc}); allowed: a folder keel can "
            "create and write in"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"run_dir={path!r} is not writable; allowed: a folder keel can write in")
    return str(Path(path))


def check_arguments(args: Mapping[str, Any]) -> None:
    """Raise ValueError for the first of `Guard`'s keyword arguments in ``args`` that is not allowed.

    ``args`` may hold any subset (the trainer callbacks check theirs when they are built, long before the
    first step builds the Guard); a name `Guard` does not take is an error too.
    """
    unknown = sorted(set(args) - set(_CHECKS))
    if unknown:
        raise ValueError(f"{unknown[0]}=...: not an argument of keel.Guard; allowed: {', '.join(sorted(_CHECKS))}")
    for name, value in args.items():
        _CHECKS[name](value, args)


def _check_policy(policy: object, args: Mapping[str, Any]) -> None:
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"policy={_short(policy)}; allowed: {', '.join(POLICIES)}")


def _check_scheduler(scheduler: object, args: Mapping[str, Any]) -> None:
    # snapshots copy the scheduler's state: under recovery it needs state_dict/load_state_dict too
    needs_state = args.get("policy") == "recover" or args.get("resume") is True or args.get("recovery") is not None
    methods = ("step", "state_dict", "load_state_dict") if needs_state else ("step",)
    if scheduler is not None and not _has_methods(scheduler, methods):
        raise ValueError(
            f"scheduler={_short(scheduler)}; allowed: None or an LR scheduler (an object with "
            f"{', '.join(m + '()' for m in methods)}, e.g. torch.optim.lr_scheduler.LambdaLR)"
        )


def _check_steps_scheduler(steps_scheduler: object, args: Mapping[str, Any]) -> None:
    if not isinstance(steps_scheduler, bool):
        raise ValueError(f"steps_scheduler={steps_scheduler!r}; allowed: True or False")
    parts = getattr(args.get("scheduler"), "schedulers", (args.get("scheduler"),))  # keel.Schedulers: each part
    needs = [s for s in parts if s is not None and step_needs_an_argument(s)]
    if steps_scheduler and needs:
        raise ValueError(
            f"scheduler={type(needs[0]).__name__}: its step() needs an argument (a metric, as ReduceLROnPlateau's "
            "step(val_loss)) that keel cannot give; allowed: steps_scheduler=False (the loop calls step(metric) "
            "itself; keel snapshots and restores the scheduler) — keel.watch does this"
        )


def step_needs_an_argument(scheduler: object) -> bool:
    """Whether ``scheduler.step()`` needs an argument keel cannot give (``ReduceLROnPlateau.step(metrics)``)."""
    try:
        signature = inspect.signature(scheduler.step)  # type: ignore[attr-defined]
    except (TypeError, ValueError):  # a builtin without a signature: keel cannot tell, and calls it bare
        return False
    return any(
        p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        for p in signature.parameters.values()
    )


def _check_scaler(scaler: object, args: Mapping[str, Any]) -> None:
    if scaler is not None and not _has_methods(scaler, ("unscale_", "step", "update", "is_enabled", "state_dict")):
        raise ValueError(f"scaler={_short(scaler)}; allowed: None or a torch.amp.GradScaler")


def _check_run_dir(run_dir: object, args: Mapping[str, Any]) -> None:
    if run_dir is not None and (not isinstance(run_dir, (str, os.PathLike)) or not isinstance(os.fspath(run_dir), str)):
        raise ValueError(f"run_dir={_short(run_dir)}; allowed: None, a str or an os.PathLike naming a folder")


def _check_log_every(log_every: object, args: Mapping[str, Any]) -> None:
    if not _is_int(log_every) or log_every < 1:  # type: ignore[operator]
        raise ValueError(f"log_every={log_every!r}; allowed: an int >= 1")


def _check_max_grad_norm(max_grad_norm: object, args: Mapping[str, Any]) -> None:
    if max_grad_norm is not None and not _positive_number(max_grad_norm):
        raise ValueError(f"max_grad_norm={max_grad_norm!r}; allowed: None or a finite number > 0")


def _check_max_consecutive_skips(value: object, args: Mapping[str, Any]) -> None:
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise ValueError(f"max_consecutive_skips={value!r}; allowed: an int >= 1")


def _check_probes(probes: object, args: Mapping[str, Any]) -> None:
    if not isinstance(probes, (str, Sequence)):
        raise ValueError(f"probes={_short(probes)}; allowed: default, transformer, full or a list of probes")


def _check_recovery(recovery: object, args: Mapping[str, Any]) -> None:
    if recovery is not None and not isinstance(recovery, RecoveryConfig):
        raise ValueError(f"recovery={_short(recovery)}; allowed: None or a keel.RecoveryConfig")


def _check_resume(resume: object, args: Mapping[str, Any]) -> None:
    if not isinstance(resume, bool):
        raise ValueError(f"resume={resume!r}; allowed: True or False")


def _check_flush_on_exit(flush_on_exit: object, args: Mapping[str, Any]) -> None:
    if not isinstance(flush_on_exit, bool):
        raise ValueError(f"flush_on_exit={flush_on_exit!r}; allowed: True or False")


def _check_overwrite(overwrite: object, args: Mapping[str, Any]) -> None:
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite={overwrite!r}; allowed: True or False")


def _check_continue_at(continue_at: object, args: Mapping[str, Any]) -> None:
    if continue_at is None:
        return
    if not is_step(continue_at):
        raise ValueError(f"continue_at={continue_at!r}; allowed: None or an int from 0 to 2**62 - 1")
    if args.get("resume") or args.get("overwrite"):
        raise ValueError(
            f"continue_at={continue_at} with resume=True or overwrite=True; allowed: one of them (continue_at goes on "
            "from a state the loop restored itself, resume from keel's snapshot, overwrite starts a new run)"
        )


def _check_seed(seed: object, args: Mapping[str, Any]) -> None:
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed={seed!r}; allowed: None or an int")


def _check_distributed(distributed: object, args: Mapping[str, Any]) -> None:
    if distributed is not None and not isinstance(distributed, (bool, DistributedConfig)):
        raise ValueError(f"distributed={_short(distributed)}; allowed: None, True, False or a keel.DistributedConfig")


def _check_detectors(detectors: object, args: Mapping[str, Any]) -> None:
    if detectors is not None:
        check_detectors(detectors)


def _check_config(config: object, args: Mapping[str, Any]) -> None:
    if config is not None:
        check_config(config)


def _check_sync(sync: object, args: Mapping[str, Any]) -> None:
    if sync not in ("step", "deferred") or not isinstance(sync, str):
        raise ValueError(
            f"sync={_short(sync)}; allowed: 'step' (read each step's signals before deciding) or "
            "'deferred' (no host sync on the hot path; keel.recover.gate)"
        )
    if sync == "deferred":
        _refuse_scaler_and_ranks(
            args,
            "sync='deferred'",
            scaler_why="the scaler's own skip reads found_inf on the host",
            scaler_allowed="sync='step' with a scaler, or bf16 without one",
            ranks_why="ranks agree through the step's reduced values",
            ranks_allowed="sync='step' under torch.distributed",
        )


def _refuse_scaler_and_ranks(
    args: Mapping[str, Any], feature: str, *, scaler_why: str, scaler_allowed: str, ranks_why: str, ranks_allowed: str
) -> None:
    """One ValueError when ``feature`` meets an enabled GradScaler or ``distributed``, which it does not support."""
    scaler, dist = args.get("scaler"), args.get("distributed")
    if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
        raise ValueError(f"{feature} with a GradScaler: not supported yet ({scaler_why}); allowed: {scaler_allowed}")
    if dist not in (None, False):
        raise ValueError(
            f"{feature} with distributed={_short(dist)}: not supported yet ({ranks_why}); allowed: {ranks_allowed}"
        )


def _check_attribution(attribution: object, args: Mapping[str, Any]) -> None:
    if attribution is not None and not isinstance(attribution, Attribution):
        raise ValueError(f"attribution={_short(attribution)}; allowed: None or a keel.Attribution(loss_fn=...)")
    recovery = args.get("recovery")
    if isinstance(recovery, RecoveryConfig) and recovery.replay:
        if attribution is None:
            raise ValueError(
                "recovery=RecoveryConfig(replay=True) without attribution: the replay recomputes the loss with the "
                "attribution's loss_fn; allowed: attribution=keel.Attribution(loss_fn=...) with replay"
            )
        _refuse_scaler_and_ranks(
            args,
            "RecoveryConfig(replay=True)",
            scaler_why="the scaler has unscaled this step's gradients already",
            scaler_allowed="replay without a scaler (bf16 or fp32)",
            ranks_why="every rank would have to replay together",
            ranks_allowed="replay in a single process",
        )
    if attribution is not None and args.get("sync") == "deferred":
        raise ValueError(
            "attribution with sync='deferred': not supported (attribution measures the batch before its update, "
            "and a deferred step's findings come after it); allowed: sync='step' with attribution"
        )


_CHECKS = {
    "policy": _check_policy,
    "scheduler": _check_scheduler,
    "scaler": _check_scaler,
    "run_dir": _check_run_dir,
    "log_every": _check_log_every,
    "max_grad_norm": _check_max_grad_norm,
    "max_consecutive_skips": _check_max_consecutive_skips,
    "probes": _check_probes,
    "detectors": _check_detectors,
    "recovery": _check_recovery,
    "resume": _check_resume,
    "overwrite": _check_overwrite,
    "continue_at": _check_continue_at,
    "config": _check_config,
    "seed": _check_seed,
    "distributed": _check_distributed,
    "sync": _check_sync,
    "attribution": _check_attribution,
    "flush_on_exit": _check_flush_on_exit,
    "steps_scheduler": _check_steps_scheduler,
}


def check_detectors(detectors: object) -> None:
    if isinstance(detectors, (str, bytes, Mapping)) or not isinstance(detectors, Sequence):
        raise ValueError(f"detectors={_short(detectors)}; allowed: None or a list of detectors")
    for i, det in enumerate(detectors):
        if not isinstance(getattr(det, "name", None), str) or not _has_methods(
            det, ("update", "state_dict", "load_state_dict")
        ):
            raise ValueError(
                f"detectors[{i}]={_short(det)}; allowed: a detector with a str name and update(), "
                "state_dict(), load_state_dict() (keel.detect.Detector)"
            )


def check_probes(probes: Sequence[object]) -> list[Probe]:
    """The built probes, checked: at least one, each a `Probe`, names unique (a failing probe is switched off
    by its name)."""
    if not probes:
        raise ValueError(f"probes={list(probes)!r}; allowed: at least one probe")
    names: set[str] = set()
    for probe in probes:
        if not isinstance(probe, Probe) or not isinstance(probe.name, str):
            raise ValueError(
                f"probes: {_short(probe)} lacks name/measure/after_step; allowed: a keel Probe or the "
                "name of a built-in probe"
            )
        if probe.name in names:
            raise ValueError(f"probes: two probes named {probe.name!r}; allowed: unique names")
        names.add(probe.name)
    return list(probes)  # type: ignore[arg-type]


def check_config(config: object) -> None:
    """``config`` must be a dict that can be stored as JSON (values that are not JSON are stored as text)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"config={_short(config)}; allowed: None or a dict")
    try:
        json.dumps(config, default=str)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"config={_short(config)}; allowed: None or a dict that can be stored as JSON (str keys; {exc})"
        ) from None


def check_loss(loss: object, name: str = "loss") -> None:
    """Raise ValueError unless ``loss`` (the argument ``name``) is a real number or a real one-element tensor."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"{name} has shape {tuple(loss.shape)}; allowed: a scalar (0-d or one-element) tensor "
                "— reduce it first, e.g. loss.mean()"
            )
        if loss.is_complex():
            raise ValueError(f"{name} is a complex tensor; allowed: a real scalar tensor or float")
    elif isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise ValueError(f"{name}={type(loss).__name__}; allowed: a scalar torch.Tensor or a float")


def _has_methods(obj: object, names: Sequence[str]) -> bool:
    return all(callable(getattr(obj, name, None)) for name in names)


def is_step(value: object) -> bool:
    """Whether ``value`` is a step number a run can start from: an int (not a bool) from 0 to 2**62 - 1."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and float(value) > 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
