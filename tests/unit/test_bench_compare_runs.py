"""bench.compare_runs: two setups' sweeps, run one after the other, side by side."""

from __future__ import annotations

import json

from bench.compare_runs import main


def _run(rate: float, goodput: float, attainment: float, failed: int = 0) -> dict:
    return {"request_rate": rate, "request_goodput": goodput, "slo_attainment": attainment,
            "median_ttft_ms": 300.0 * rate, "median_tpot_ms": 5.0, "p99_tpot_ms": 9.5, "failed": failed}


def test_rows_pair_setups_by_image_count_and_rate_with_the_goodput_ratio(tmp_path, capsys):
    (tmp_path / "split_4img.json").write_text(json.dumps({"runs": [_run(4, 3.0, 0.75), _run(2, 2.0, 1.0)]}))
    (tmp_path / "colocated_4img.json").write_text(json.dumps({"runs": [_run(2, 2.0, 1.0), _run(4, 1.5, 0.375)]}))
    (tmp_path / "colocated_1img.json").write_text(json.dumps({"runs": [_run(8, 0.0, 0.0, failed=3)]}))
    assert main([str(tmp_path), "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "goodput split / colocated" in lines[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [("1", "8"), ("4", "2"), ("4", "4")]
    assert rows[0][2] == "not run" and rows[0][-1] == "n/a" and rows[0][-2] == "3"
    assert rows[1][-1] == "1.00" and rows[2][-1] == "2.00"
    assert rows[2][2] == "75.0%" and rows[2][7] == "37.5%" and rows[2][4] == "1,200"


def test_a_directory_without_results_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no <setup>_<n>img.json results" in capsys.readouterr().err
