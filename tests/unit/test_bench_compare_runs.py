"""bench.compare_runs: two setups' sweeps, run one after the other, side by side."""

from __future__ import annotations

import json

import pytest

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


def test_a_tighter_slo_scores_the_runs_again_from_their_requests(tmp_path, capsys):
    run = {**_run(4, 3.0, 0.75), "duration": 2.0, "ttfts": [0.2, 0.45, 0.6, 0.3, None],
           "tpots": [0.020, 0.030, 0.010, None, None], "errors": ["", "", "", "", "HTTP 500"]}
    (tmp_path / "split_4img.json").write_text(json.dumps({"runs": [run]}))
    (tmp_path / "colocated_4img.json").write_text(json.dumps({"runs": [{**run, "tpots": [0.02] * 5}]}))
    assert main([str(tmp_path), "--markdown", "--slo", "ttft_ms=500", "tpot_ms=25"]) == 0
    row = [c.strip() for c in capsys.readouterr().out.splitlines()[2].strip("|").split("|")]
    # split: 0.2 s / 20 ms and 0.3 s / one token are good; 0.45 s / 30 ms and 0.6 s are not; the error is not
    assert row[2] == "40.0%" and row[3] == "1.00"
    assert row[7] == "60.0%" and row[8] == "1.50" and row[-1] == "0.67"


def test_an_unknown_slo_key_is_refused(tmp_path):
    (tmp_path / "split_4img.json").write_text(json.dumps({"runs": [_run(4, 3.0, 0.75)]}))
    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path), "--slo", "e2e_ms=3"])
    assert refused.value.code == 2
