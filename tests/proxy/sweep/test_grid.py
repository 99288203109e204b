import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.proxy.sweep import SweepConfig, default_lrs, expand_grid, list_recipes, quick_config, resolve_recipe
from keel.proxy.trainer import TrainConfig


def test_default_lr_grid_is_the_papers_range():
    assert default_lrs() == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    assert default_lrs(1e-3, 1e-1, per_decade=1) == [1e-3, 1e-2, 1e-1]
    with pytest.raises(ValueError, match="0 < low < high"):
        default_lrs(1e-1, 1e-3)


def test_grid_expands_every_combination_with_stable_ids():
    config = SweepConfig(recipes=["baseline", "qk_norm"], lrs=[1e-3, 1e-2], sizes=["tiny", "small"], seeds=[0, 1])
    specs = expand_grid(config)
    assert len(specs) == 2 * 2 * 2 * 2 and len({s.run_id for s in specs}) == 16
    assert specs[0].run_id == "baseline/tiny/lr=0.001/seed=0" and specs[-1].size == "small"
    by_id = {s.run_id: s for s in specs}
    qk = by_id["qk_norm/small/lr=0.01/seed=1"].config
    assert qk.qk_norm and qk.lr == 1e-2 and qk.seed == 1 and qk.size == "small" and qk.max_grad_norm == 1.0
    assert not by_id["baseline/small/lr=0.01/seed=1"].config.qk_norm


def test_builtin_recipes_change_what_they_name():
    base = TrainConfig(size="tiny", steps=200)
    changed = {name: resolve_recipe(name)[1](base) for name in list_recipes()}
    assert changed["baseline"] == base
    assert changed["qk_norm"].qk_norm and changed["qk_norm"].z_loss == 0
    assert changed["z_loss"].z_loss == 1e-4 and not changed["z_loss"].qk_norm
    assert changed["qk_norm_z_loss"].qk_norm and changed["qk_norm_z_loss"].z_loss == 1e-4
    wd = changed["independent_wd"]
    assert wd.optimizer == "independent_adamw" and wd.weight_decay == 1e-4 and not wd.qk_norm
    assert changed["decoupled_wd"].optimizer == "adamw" and changed["decoupled_wd"].weight_decay == 0.1


def test_user_recipe_from_a_file_and_a_raising_recipe(tmp_path):
    path = tmp_path / "my_recipes.py"
    path.write_text(
        "import dataclasses\ndef long_warmup(base):\n    return dataclasses.replace(base, warmup=base.steps // 2)\n"
    )
    name, fn = resolve_recipe(f"{path}:long_warmup")
    assert name == "long_warmup" and fn(TrainConfig(steps=100)).warmup == 50

    def broken(base):
        raise RuntimeError("no such optimizer here")

    specs = expand_grid(SweepConfig(recipes=["baseline", broken], lrs=[1e-3], sizes=["tiny"]))
    assert specs[0].config is not None and specs[0].error is None
    assert specs[1].config is None and "recipe 'broken' raised RuntimeError: no such optimizer here" in specs[1].error

    def not_a_config(base):
        return {"lr": 1}

    assert (
        "allowed: a keel.proxy.trainer.TrainConfig"
        in expand_grid(SweepConfig(recipes=[not_a_config], lrs=[1e-3], sizes=["tiny"]))[0].error
    )


@pytest.mark.parametrize(
    "recipe, match",
    [
        ("nope", "unknown recipe 'nope'; allowed: baseline"),
        ("no_such_module_xyz:f", "cannot be imported"),
        ("keel.proxy.sweep.recipes:missing", "has no function 'missing'"),
        ("/no/such/file.py:f", "not found"),
    ],
)
def test_bad_recipe_names_raise_before_anything_runs(recipe, match):
    with pytest.raises(ValueError, match=match):
        expand_grid(SweepConfig(recipes=[recipe], lrs=[1e-3], sizes=["tiny"]))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("lrs", [], r"SweepConfig.lrs=\[\]; allowed: at least one value"),
        ("lrs", [1e-3, -1.0], r"SweepConfig.lrs contains \[-1.0\]"),
        ("sizes", ["huge"], r"SweepConfig.sizes contains \['huge'\]; allowed: tiny"),
        ("base", {"steps": 10}, r"SweepConfig.base=\{'steps': 10\}; allowed: a keel.proxy.trainer.TrainConfig"),
        # one run id twice: run_sweep failed with sqlite3.IntegrityError 'UNIQUE constraint failed: runs.run_id'
        ("lrs", [1e-2, 3e-2, 1e-2], r"SweepConfig.lrs=\[0.01, 0.03, 0.01\] names the run lr=0.01 twice"),
        ("lrs", [1e-3, 0.0010000001], r"names the run lr=0.001 twice; allowed: each value once"),
        ("sizes", ["tiny", "tiny"], r"SweepConfig.sizes=\['tiny', 'tiny'\] names the run tiny twice"),
        ("seeds", [0, 1, 0], r"SweepConfig.seeds=\[0, 1, 0\] names the run seed=0 twice"),
        # the sweep store keeps seeds as SQLite integers: 2**63 failed with OverflowError after the grid was built
        ("seeds", [0, 2**63], r"seeds contains \[9223372036854775808\]; allowed: ints from 0 to 2\*\*63 - 1"),
        ("seeds", [-1], r"SweepConfig.seeds contains \[-1\]; allowed: ints from 0"),
    ],
)
def test_bad_config_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        SweepConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("steps", 0, "TrainConfig.steps=0; allowed: an int >= 1"),
        ("warmup", -1, "TrainConfig.warmup=-1; allowed: an int >= 0"),
        ("max_grad_norm", 0.0, "TrainConfig.max_grad_norm=0.0; allowed: a number > 0 or None"),
    ],
)
def test_bad_run_settings_are_the_train_configs_to_refuse(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


@settings(max_examples=60, deadline=None)
@given(
    lrs=st.lists(st.floats(1e-12, 1e3), min_size=1, max_size=6),
    seeds=st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=3),
    sizes=st.lists(st.sampled_from(["tiny", "small", "medium"]), min_size=1, max_size=3),
)
def test_an_accepted_grid_names_each_run_once(lrs, seeds, sizes):
    # Attack: every grid SweepConfig accepts expands to distinct run ids (the sweep store's key); one it
    # refuses says which value repeats.
    try:
        config = SweepConfig(recipes=["baseline"], lrs=lrs, seeds=seeds, sizes=sizes)
    except ValueError as exc:
        assert "twice; allowed: each value once" in str(exc)
        return
    ids = [spec.run_id for spec in expand_grid(config)]
    assert len(ids) == len(set(ids)) == len(lrs) * len(seeds) * len(sizes)


def test_duplicate_recipe_names_raise():
    with pytest.raises(ValueError, match="each name once"):
        expand_grid(SweepConfig(recipes=["baseline", "baseline"], lrs=[1e-3], sizes=["tiny"]))


def test_describe_is_json_and_quick_grid_is_small():
    def mine(base):
        return base

    text = json.dumps(SweepConfig(recipes=["baseline", mine]).describe())
    assert '"recipes": ["baseline", "mine"]' in text
    described = SweepConfig().describe()
    assert described["base"]["steps"] == 300 and described["base"]["max_grad_norm"] == 1.0
    assert not {"size", "lr", "seed", "min_lr_ratio"} & set(described["base"])  # the grid sets those
    quick = quick_config()
    runs = len(expand_grid(quick))
    assert runs <= 16 and quick.base.steps <= 300 and quick.base == SweepConfig().base
    full = {s.run_id: s.config for s in expand_grid(SweepConfig(recipes=quick.recipes, sizes=quick.sizes))}
    assert all(full[s.run_id] == s.config for s in expand_grid(quick))  # the same runs as the full grid's


def test_every_run_decays_to_the_same_final_lr_whatever_its_peak():
    from keel.proxy.trainer import lr_lambda

    base = TrainConfig(steps=50, max_grad_norm=1.0)
    specs = expand_grid(SweepConfig(recipes=["baseline"], lrs=[1e-5, 1e-3, 3e-1], sizes=["tiny"], base=base))
    for spec in specs:  # the paper's schedule: warm-up, then cosine decay to 1e-5 (a peak at 1e-5 stays flat)
        factor = lr_lambda(spec.config)
        assert spec.lr * factor(spec.config.warmup) == pytest.approx(spec.lr)  # the peak, after warm-up
        assert spec.lr * factor(spec.config.steps) == pytest.approx(1e-5)
    assert specs[0].config.min_lr_ratio == 1.0
    keeps_a_tenth = expand_grid(SweepConfig(recipes=["baseline"], lrs=[1e-2], sizes=["tiny"], final_lr=1e-3))
    assert keeps_a_tenth[0].config.min_lr_ratio == pytest.approx(0.1)
    with pytest.raises(ValueError, match="SweepConfig.final_lr=-1.0; allowed: a finite number >= 0"):
        SweepConfig(final_lr=-1.0)


def test_a_module_recipe_in_the_working_folder_is_found_without_it_on_sys_path(tmp_path, monkeypatch):
    # what the `keel` console script sees: neither '' nor the working folder on sys.path
    (tmp_path / "my_recipes_wf.py").write_text("def longer(c):\n    return c\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    name, fn = resolve_recipe("my_recipes_wf:longer")
    assert name == "longer" and callable(fn)
    with pytest.raises(ValueError, match="recipe module 'no_such_module_wf' cannot be imported"):
        resolve_recipe("no_such_module_wf:fn")
