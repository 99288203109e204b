import json

from keel.cli import main


def test_bench_overhead_json_has_the_ratios(capsys):
    assert main(["bench", "overhead", "--json", "--size", "tiny", "--steps", "3", "--repeats", "2",
                 "--batch-size", "4", "--seq-len", "16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"ratio_default", "ratio_full", "step_ms"}
    assert result["ratio_default"] > 0 and result["ratio_full"] > 0
    assert set(result["step_ms"]) == {"bare", "default", "full"}
