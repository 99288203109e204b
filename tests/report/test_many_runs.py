"""A report of many runs (a week of runs, a sweep's folder): every run keeps a color of its own.

Helper E (session 16): a 50-run report drew run_00, run_08, run_16 … run_48 in the same blue (the 8-color palette
cycled), in every chart, legend, swatch and the named-cause list.
"""

from __future__ import annotations

import colorsys
import re

from keel.report import build_page, load_run
from keel.report.page import PALETTE, RUN_HUES, run_colors
from keel.store import RunWriter
from tests.report.test_page import _payload


def hue(color: str) -> float:
    red, green, blue = (int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return colorsys.rgb_to_hls(red, green, blue)[0] * 360


def test_every_run_of_a_long_list_has_its_own_color_and_none_takes_the_marks_red_or_orange():
    assert run_colors(3) == list(PALETTE[:3])  # a few runs look as they did
    for count in (9, 50, 200):
        colors = run_colors(count)
        assert len(set(colors)) == count
        assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colors)
        assert all(RUN_HUES[0] - 1 <= hue(c) <= RUN_HUES[1] + 1 for c in colors), count


def test_a_page_of_twelve_runs_draws_twelve_colors(tmp_path):
    runs = []
    for i in range(12):
        with RunWriter(tmp_path / f"run_{i:02d}") as writer:
            writer.add_series("loss", range(20), [2.0 - i * 0.01] * 20)
        runs.append(load_run(tmp_path / f"run_{i:02d}"))
    page = build_page(runs)
    colors = [r["color"] for r in _payload(page)["runs"]]
    assert len(set(colors)) == 12
    swatches = re.findall(r"class='swatch' style='background:(#[0-9a-f]{6})'", page)
    assert set(swatches) == set(colors)
