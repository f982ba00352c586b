"""``epd bench --compare-url`` against two scripted servers, and the server queue read from /metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bench_fake_server import FakeChatServer, Script, ServerLog
from PIL import Image

from bench.cli import main
from bench.server_queue import parse_gauges

FAST = Script(ttft_s=(0.02,), itl_s=0.005)
SLOW = Script(ttft_s=(0.1,), itl_s=0.005, max_parallel=1)  # one request at a time: the rest queue
WORKLOAD = ["--num-prompts", "6", "--random-output-len", "3", "--burstiness", "100", "--no-progress"]


def _bench(base: FakeChatServer, *extra: str) -> int:
    return main(["--base-url", base.base_url, "--model", "fake-model", *WORKLOAD, *extra])


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True)


def _busy(log: ServerLog) -> list[tuple[float, float]]:
    """When the server was streaming each request (perf_counter seconds)."""
    return [(log.arrivals[i], log.arrivals[i] + log.last_chunk_s[i]) for i in log.last_chunk_s]


def _compare(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any], ServerLog, ServerLog]:
    out = tmp_path / "compare.json"
    with FakeChatServer(FAST) as fast, FakeChatServer(SLOW) as slow:
        argv = ["--compare-url", slow.base_url, "--label", "fast", "--compare-label", "slow"]
        rc = _bench(fast, *argv, "--metrics-poll-interval", "0.05", "--output", str(out), *extra)
        logs = fast.log, slow.log
    return rc, json.loads(out.read_text()), *logs


def test_both_servers_get_the_same_workload_one_after_the_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, result, fast, slow = _compare(tmp_path, "--request-rate", "20", "--compare-model", "other-model")
    assert rc == 0
    base, other = result["base"], result["compare"]
    assert (base["label"], other["label"]) == ("fast", "slow")
    assert (base["model"], other["model"]) == ("fake-model", "other-model")
    assert [b["model"] for b in slow.bodies] == ["other-model"] * 6
    assert sorted(_dumps(b) for b in fast.bodies) == sorted(_dumps({**b, "model": "fake-model"}) for b in slow.bodies)
    a_sends, b_sends = base["runs"][0]["send_times"], other["runs"][0]["send_times"]
    assert a_sends[-1] > 0.15  # 6 requests at 20 req/s span about 0.25 s
    assert all(abs(a - b) < 0.05 for a, b in zip(a_sends, b_sends, strict=True))  # one arrival schedule
    overlapping = [(x, y) for x in _busy(fast) for y in _busy(slow) if x[0] < y[1] and y[0] < x[1]]
    assert overlapping == []  # never both servers at once
    printed = capsys.readouterr().out
    assert "Comparison at 20 req/s" in printed and "Goodput ratio fast / slow:" in printed
    assert "Serving Benchmark Result" not in printed  # the side-by-side table replaces it


def test_the_faster_server_wins_and_the_goodput_ratio_is_base_over_compare(tmp_path: Path) -> None:
    rc, result, _, _ = _compare(tmp_path, "--sweep-rates", "20,inf", "--slo", "ttft_ms=250")
    assert rc == 0
    runs = list(zip(result["base"]["runs"], result["compare"]["runs"], strict=True))
    assert [(a["request_rate"], b["request_rate"]) for a, b in runs] == [(20, 20), ("inf", "inf")]
    for a, b in runs:
        assert a["completed"] == b["completed"] == 6
        assert a["median_ttft_ms"] < 60 < 90 < b["median_ttft_ms"]
        assert a["slo_attainment"] == 1.0 > b["slo_attainment"]  # the slow server queues past 250 ms
        assert a["request_goodput"] > b["request_goodput"] > 0
    ratios = result["goodput_ratio"]
    assert [r["request_rate"] for r in ratios] == [20, "inf"]
    for (a, b), r in zip(runs, ratios, strict=True):
        assert (r["base_goodput"], r["compare_goodput"]) == (a["request_goodput"], b["request_goodput"])
        assert r["ratio"] == pytest.approx(a["request_goodput"] / b["request_goodput"])
        assert r["ratio"] > 1
    assert "best_rate" not in result and "runs" not in result  # each server has its own
    assert result["base"]["best_rate"] == "inf" and result["compare"]["best_rate"] is None


def test_compare_plots_put_both_servers_on_the_sweep_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    argv = ["--sweep-rates", "20,inf", "--slo", "ttft_ms=250", "tpot_ms=50", "--plot", str(plots)]
    rc, result, _, _ = _compare(tmp_path, *argv)
    assert rc == 0
    names = {"ttft_cdf.png", "tpot_cdf.png", "sweep_throughput.png", "sweep_latency.png"}
    names |= {f"timeline_{server}_rate{rate}.png" for server in ("fast", "slow") for rate in ("20", "inf")}
    assert {p.name for p in plots.iterdir()} == names
    for name in names:
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and image.size[0] >= 300


def test_queue_samples_show_the_backlog_of_a_busy_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    with FakeChatServer(SLOW) as server:
        assert _bench(server, "--metrics-poll-interval", "0.05", "--output", str(out)) == 0
        scrapes = server.log.scrapes
    queue = json.loads(out.read_text())["server_queue"]
    assert queue["metrics_url"] == f"{server.base_url}/metrics" and queue["note"] == ""
    assert len(queue["times"]) == scrapes >= 5  # 6 requests x 0.11 s, one scrape per 0.05 s
    assert queue["times"] == sorted(queue["times"]) and queue["times"][0] < 0.05
    assert max(queue["waiting"]) >= 3 and max(queue["running"]) == 1  # 6 sent at once, served one by one
    assert "Server queue (" in capsys.readouterr().out


def test_a_server_without_metrics_is_reported_and_the_run_still_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    with FakeChatServer(Script(ttft_s=(0.02,), itl_s=0.005, metrics=False)) as server:
        assert _bench(server, "--output", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 6
    assert result["server_queue"]["times"] == [] and "HTTP 404" in result["server_queue"]["note"]
    assert "Server queue: not recorded (GET " in capsys.readouterr().out


def test_no_metrics_poll_leaves_the_metrics_endpoint_alone(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    with FakeChatServer(FAST) as server:
        assert _bench(server, "--no-metrics-poll", "--output", str(out)) == 0
        assert server.log.scrapes == 0
    assert json.loads(out.read_text())["server_queue"] is None


def test_one_server_twice_gets_two_distinct_default_labels(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    with FakeChatServer(FAST) as server:
        assert _bench(server, "--compare-url", server.base_url + "/v1", "--output", str(out)) == 0
    result = json.loads(out.read_text())
    host = server.base_url.removeprefix("http://")
    assert (result["base"]["label"], result["compare"]["label"]) == (f"{host} (base)", f"{host} (compare)")
    assert "api_key" not in result["config"]["compare"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compare-model", "m"], "--compare-model needs --compare-url"),
        (["--compare-url", "http://b:1", "--label", "x", "--compare-label", "x"], "must differ"),
        (["--metrics-poll-interval", "0"], "--metrics-poll-interval must be positive"),
    ],
)
def test_bad_compare_options_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--model", "m", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_gauges_are_summed_over_their_series_and_other_families_ignored() -> None:
    text = (
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_waiting{engine="1",model_name="a}b"} 4 1700000000\n'
        "vllm:num_requests_running 2\n"
        'epd:num_requests_waiting{model_name="m"} 100\n'
        "vllm:num_requests_waiting_total 9\n"
    )
    assert parse_gauges(text) == {"vllm:num_requests_waiting": 7.0, "vllm:num_requests_running": 2.0}
