"""Healthy run with one-batch data outliers: three isolated batches of upper-cased source text.

A tiny-proxy run at LR 3e-3 sees, at steps 120, 170 and 220, a batch whose letters are upper-cased: real
text, harder for the model (its loss is ~1.3× the running level), but nothing is wrong with training.
keel may note each as an ``info`` outlier; a warning or critical finding is a false alarm.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.proxy.trainer import Batch, TrainConfig

OUTLIER_STEPS = (120, 170, 220)


def upper(step: int, batch: Batch) -> Batch:
    if step not in OUTLIER_STEPS:
        return batch
    x, y = batch
    lower = lambda t: (t >= ord("a")) & (t <= ord("z"))  # noqa: E731
    return x - 32 * lower(x).long(), y - 32 * lower(y).long()


@SCENARIOS.register("data_outliers")
class DataOutliers(LMScenario):
    spec = ScenarioSpec(
        name="data_outliers",
        healthy=True,
        expected_kind=None,
        summary="healthy tiny proxy with three isolated upper-cased batches",
    )

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=250, lr=3e-3, batch_fn=upper, seed=seed)
