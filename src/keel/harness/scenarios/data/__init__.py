"""Data-attribution scenarios (issue 17): poisoned examples in a real corpus, keel's skip list and replay.

`poisoned_examples` trains the tiny proxy LM on windows of the proxy corpus with a handful of poisoned examples
mixed into otherwise clean batches, under ``Guard(policy="skip", attribution=..., recovery=RecoveryConfig(
replay=True))``, and measures what keel names, what it writes to the skip list, whether a resumed run and a
fresh run that honour the list ever draw a poisoned example, and how their final loss compares with a run that
never had them. `keel bench data` runs it (`keel.harness.bench.data`).
"""

from keel.harness.scenarios.data.poisoned_examples import PoisonConfig, PoisonResult, run_poisoned_examples

__all__ = ["PoisonConfig", "PoisonResult", "run_poisoned_examples"]
