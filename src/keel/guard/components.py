"""The probes and detectors a `Guard` runs, each behind its own fence: the first error disables that one alone.

keel must never make a run worse. A probe or detector that raises — or returns something outside its contract
(a probe a float or a string instead of a tensor, a detector something other than Findings) — is recorded once
as a ``keel_error`` finding against its own name and switched off for the rest of the run; every other probe and
detector keeps protecting the run. The same holds for a detector whose state cannot be copied into a snapshot
or loaded back: snapshots go on without it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from keel._core.finding import Finding
from keel._core.observation import Observation
from keel.detect import Detector
from keel.detect.scan import ReadsKeys
from keel.signals import Measurements, PerParam, Probe, StepContext

OnError = Callable[[str, int, BaseException, bool], None]


class Components:
    """Runs probes and detectors for one `Guard`; ``fail`` disables exactly the component that went wrong.

    Args:
        probes: The probes, each with a unique ``name``.
        detectors: The detectors.
        on_error: Called once per failing component with (component, step, exception, disabled): the Guard
            records it.

    Attributes:
        disabled: The components switched off so far, in order (probe names, ``detector:<name>``, or the
            Guard's own parts such as ``recorder`` and ``snapshots``).
        failures: How many times each component that is tried again (``disable=False``) failed, the first
            included: one ``keel_error`` finding says the first, the run's summary says how many there were.
    """

    def __init__(self, probes: Sequence[Probe], detectors: Sequence[Detector], on_error: OnError) -> None:
        self.probes, self.detectors = list(probes), list(detectors)
        self.disabled: list[str] = []
        self.step = 0  # the step being worked on: errors raised from inside a snapshot are dated with it
        self._on_error = on_error
        self._reported: set[str] = set()
        self.failures: Counter[str] = Counter()
        self._awake_by_layout: dict[tuple[tuple, ...], list[tuple[str, Detector]]] = {}

    def fail(self, component: str, step: int, exc: BaseException, *, disable: bool = True) -> None:
        """Report ``component``'s error once and (unless ``disable=False``) switch it off.

        ``disable=False`` is for failures no single component can be blamed for: they are reported once and
        the work is tried again on the next step.
        """
        if not disable:
            self.failures[component] += 1
        if component in self._reported:
            return
        self._reported.add(component)
        if disable:
            self.disabled.append(component)
        self._on_error(component, step, exc, disable)

    def enabled(self, component: str) -> bool:
        return component not in self.disabled

    # --- probes --------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        for probe in self.probes:
            attach = getattr(probe, "attach", None)
            if attach is not None:
                self.call(probe.name, attach, model)

    def remove_probe(self, name: str) -> Probe:
        """Stop running the probe called ``name`` (detached from the model first, behind its fence); returns it.

        Raises:
            ValueError: No probe is called ``name``; the message names those there are.
        """
        probe = next((p for p in self.probes if p.name == name), None)
        if probe is None:
            allowed = ", ".join(repr(p.name) for p in sorted(self.probes, key=lambda p: p.name)) or "none (no probes)"
            raise ValueError(f"Guard.remove_probe({name!r}): no such probe; allowed: {allowed}")
        self.probes.remove(probe)
        detach = getattr(probe, "detach", None)
        if detach is not None:
            self.call(name, detach)  # a hooked probe left attached would keep measuring into nothing
        return probe

    def measure(self, ctx: StepContext) -> Measurements:
        """Every enabled probe's measurements before the update, each checked against the probe contract."""
        return self._gather(ctx, "measure")

    def after_step(self, ctx: StepContext) -> Measurements:
        """Every enabled probe's measurements after the update (only called when the update was applied)."""
        return self._gather(ctx, "after_step")

    def detach(self, step: int) -> None:
        for probe in self.probes:
            detach = getattr(probe, "detach", None)
            if detach is not None:
                try:
                    detach()
                except Exception as exc:
                    self.fail(probe.name, step, exc)

    def _gather(self, ctx: StepContext, method: str) -> Measurements:
        out: Measurements = {}
        for probe in self.probes:
            out.update(self.call(probe.name, _measured, getattr(probe, method), ctx) or {})
        return out

    # --- detectors -----------------------------------------------------------------------------------
    def detect(self, obs: Observation) -> list[Finding]:
        """Every enabled detector's findings on ``obs``, but for those that read none of its keys: a `ReadsKeys`
        detector promises that such an observation changes nothing (as `keel doctor` relies on), and in a run with
        the default probes most of the default detectors read signals it does not measure (attention, MoE, evals …),
        so calling each of them every step was most of the Guard's fixed cost on a small model."""
        found: list[Finding] = []
        for label, detector in self._awake(obs):
            found.extend(self.call(label, _detected, detector, obs) or [])
        return found

    def _awake(self, obs: Observation) -> list[tuple[str, Detector]]:
        """The detectors (with their labels) that read a key ``obs`` holds, or that name none; cached by the
        observation's keys, which repeat from step to step (and by the detectors: the list is public)."""
        layout = (tuple(obs.values), tuple(obs.per_param), tuple(map(id, self.detectors)))
        awake = self._awake_by_layout.get(layout)
        if awake is None:
            if len(self._awake_by_layout) >= 64:  # keys that keep changing (a loop's own signals): no unbounded cache
                self._awake_by_layout.clear()
            awake = [(detector_label(d), d) for d in self.detectors if _reads_any(d, layout[0], layout[1])]
            self._awake_by_layout[layout] = awake
        return awake

    def stateful(self, detector: Detector) -> FencedState:
        """``detector``'s state for snapshots, fenced: a failure disables the detector instead of the snapshot."""
        return FencedState(detector, detector_label(detector), self)

    def call(self, component: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` behind ``component``'s fence: None, and the component switched off, if it raises."""
        if not self.enabled(component):
            return None
        try:
            return fn(*args)
        except Exception as exc:
            self.fail(component, self.step, exc)
            return None


class FencedState:
    """A detector's ``state_dict``/``load_state_dict`` as a snapshot sees them, behind its fence."""

    def __init__(self, detector: Detector, label: str, components: Components) -> None:
        self.detector, self.label, self.components = detector, label, components

    def state_dict(self) -> dict[str, Any]:
        return self.components.call(self.label, _state_of, self.detector) or {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:  # {}: the detector was switched off when this snapshot was taken
            self.components.call(self.label, self.detector.load_state_dict, state)


def _reads_any(detector: Detector, values: Sequence[str], families: Sequence[str]) -> bool:
    """Whether ``detector`` may read a key among ``values`` and ``families`` (`keel.detect.scan.ReadsKeys`: value keys,
    and families ending in "/" — a per-parameter family, or value keys under that prefix, as ``eval/<name>``); True
    for a detector that does not say what it reads, or says it oddly."""
    try:
        reads = detector.reads if isinstance(detector, ReadsKeys) else None
    except Exception:  # a property that raises: the detector's own update, behind its fence, tells
        return True
    if not isinstance(reads, (tuple, list)) or not all(isinstance(k, str) for k in reads):
        return True
    present = set(values) | set(families)
    prefixes = [k for k in reads if k.endswith("/")]
    return any(k in present for k in reads) or any(v.startswith(p) for p in prefixes for v in (*values, *families))


def detector_label(detector: Detector) -> str:
    return f"detector:{detector.name}"


def checked_measurements(measured: object, device: torch.device) -> Measurements:
    """A probe's result, checked against the probe contract; raises TypeError naming what is wrong.

    Allowed: a dict of signal key (str) → a real-valued one-element tensor, or `PerParam` (names and a tensor
    with one value per name). A tensor on another device than the loss is moved there (a probe measuring on
    the CPU in a CUDA run): the packed copy needs one device.
    """
    if not isinstance(measured, dict):
        raise TypeError(f"returned {type(measured).__name__}; allowed: a dict of signal key → tensor")
    out: Measurements = {}
    for key, value in measured.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"signal key {key!r}; allowed: a non-empty str")
        if isinstance(value, PerParam):
            names, values = value
            if (
                not isinstance(values, Tensor)
                or values.numel() != len(names)
                or not all(isinstance(n, str) for n in names)
            ):
                raise TypeError(
                    f"{key}: PerParam with {len(names)} names and values of type "
                    f"{type(values).__name__}; allowed: str names and a tensor with one value per name"
                )
            _check_tensor(key, values)
            out[key] = PerParam(tuple(names), values if values.device == device else values.to(device))
        elif isinstance(value, Tensor):
            if value.numel() != 1:
                raise TypeError(f"{key}: a tensor of shape {tuple(value.shape)}; allowed: one value (0-d tensor)")
            _check_tensor(key, value)
            out[key] = value if value.device == device else value.to(device)
        else:
            raise TypeError(
                f"{key}: {type(value).__name__} {_short(value)}; allowed: a 0-d torch.Tensor or PerParam "
                "(kept on device, so the step's one host copy carries it)"
            )
    return out


def checked_findings(found: object) -> list[Finding]:
    """A detector's result, checked: a list (or tuple) of `Finding`; raises TypeError otherwise."""
    if not isinstance(found, (list, tuple)):
        raise TypeError(f"update() returned {type(found).__name__}; allowed: a list of keel Finding")
    for item in found:
        if not isinstance(item, Finding):
            raise TypeError(f"update() returned a {type(item).__name__} {_short(item)}; allowed: keel Finding")
    return list(found)


def _measured(measure: Callable[[StepContext], object], ctx: StepContext) -> Measurements:
    return checked_measurements(measure(ctx), ctx.loss.device)


def _detected(detector: Detector, obs: Observation) -> list[Finding]:
    return checked_findings(detector.update(obs))


def _state_of(detector: Detector) -> dict[str, Any]:
    state = detector.state_dict()
    if not isinstance(state, dict):
        raise TypeError(f"state_dict() returned {type(state).__name__}; allowed: a dict")
    return state


def _check_tensor(key: str, value: Tensor) -> None:
    if value.is_complex() or value.device.type == "meta":
        raise TypeError(f"{key}: a {value.dtype} tensor on {value.device}; allowed: real values on a real device")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
