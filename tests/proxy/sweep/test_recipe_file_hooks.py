"""A ``file.py:function`` recipe that sets a TrainConfig hook (``lr_factor``, a function of that file) runs under a
local sweep's spawned workers as it does in one process: every run raised "PicklingError: Can't pickle <function
spike>: import of module 'keel_recipe_hooked' failed" with --workers 2 (reviewer V14)."""

from __future__ import annotations

import os
import pickle
import sys
import textwrap

import pytest

from keel.proxy.sweep.backends.local import recipe_files_importable, start_worker
from keel.proxy.sweep.recipes import RECIPE_FILES, resolve_recipe
from keel.proxy.trainer import TrainConfig

RECIPE = textwrap.dedent(
    """
    import dataclasses

    def spike(step):
        return 10.0 if step == 5 else 1.0

    def lr_spike(base):
        return dataclasses.replace(base, lr_factor=spike)
    """
)


@pytest.fixture
def hooked_recipe(tmp_path):
    path = tmp_path / "hooked.py"
    path.write_text(RECIPE)
    yield f"{path}:lr_spike"
    for name in [n for n in RECIPE_FILES if n.startswith("keel_recipe_hooked")]:
        RECIPE_FILES.pop(name)


def test_a_hook_from_a_recipe_file_pickles_in_the_sweep_and_loads_in_a_worker(hooked_recipe):
    _, recipe = resolve_recipe(hooked_recipe)
    config = recipe(TrainConfig(size="tiny"))
    with pytest.raises(pickle.PicklingError):  # the file's module is not importable by name: as it was
        pickle.dumps(config)
    with recipe_files_importable():  # as the local backend's pool runs
        shipped = pickle.dumps(config)
    assert not [n for n in sys.modules if n.startswith("keel_recipe_")]  # as it was (Ray's cloudpickle: by value)
    # a spawned worker: its initializer loads the file under the same name, then the task unpickles
    start_worker(os.getppid(), {name: path for name, (path, _) in RECIPE_FILES.items()})  # (its parent: this one's)
    try:
        received = pickle.loads(shipped)
        assert received.lr_factor(5) == 10.0 and received.lr_factor(4) == 1.0
    finally:
        for name in RECIPE_FILES:
            sys.modules.pop(name, None)


@pytest.mark.slow  # a real --workers 2 sweep (spawned workers import torch)
def test_a_hooked_file_recipe_sweeps_with_two_workers(hooked_recipe, tmp_path):
    from keel.proxy.sweep import run_sweep
    from keel.proxy.sweep.grid import SweepConfig

    config = SweepConfig(
        recipes=(hooked_recipe,), sizes=("tiny",), lrs=(1e-2, 3e-2), base=TrainConfig(size="tiny", steps=8)
    )
    result = run_sweep(config, tmp_path / "sweep", workers=2)
    assert sorted(r["status"] for r in result.rows) == ["done", "done"], [r.get("error") for r in result.rows]


def test_two_recipe_files_of_one_name_in_two_folders_are_two_modules(tmp_path):
    # two hooked.py in two folders were one module name: the second replaced the first
    # in a local sweep's workers (reviewer V14's leftover)
    paths = []
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "hooked.py").write_text(RECIPE)
        paths.append(f"{tmp_path / folder / 'hooked.py'}:lr_spike")
    try:
        for recipe in paths:
            resolve_recipe(recipe)
        names = [n for n in RECIPE_FILES if n.startswith("keel_recipe_hooked")]
        assert len(names) == 2
    finally:
        for name in [n for n in RECIPE_FILES if n.startswith("keel_recipe_hooked")]:
            RECIPE_FILES.pop(name)
