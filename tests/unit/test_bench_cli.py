"""``python -m bench`` end to end against the scripted server: output, JSON, plots, sweeps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_fake_server import FakeChatServer, Script
from PIL import Image

from bench.cli import main
from bench.config import ClientConfig, parse_slo

REPO = Path(__file__).resolve().parents[2]
FAST = Script(ttft_s=(0.03,), itl_s=0.003)
LATENCY_KEYS = [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p90", "p99")]
RUN_KEYS = [
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput", "request_goodput", "ttfts", "itls", "input_lens",
    "output_lens", "errors", *LATENCY_KEYS,
]  # fmt: skip


def _args(server: FakeChatServer, *extra: str) -> list[str]:
    return ["--base-url", server.base_url, "--model", "fake-model", "--no-progress", *extra]


def test_json_result_has_the_vllm_keys_and_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res" / "result.json"
    with FakeChatServer(FAST) as server:
        argv = ["--num-prompts", "5", "--random-output-len", "4", "--warmup-requests", "2"]
        rc = main(_args(server, *argv, "--slo", "ttft_ms=5000", "tpot_ms=500", "--output", str(out)))
        received = len(server.log.bodies)
    assert rc == 0
    assert received == 7  # warm-up requests go to the server but not into the figures
    result = json.loads(out.read_text())
    assert [k for k in RUN_KEYS if k not in result] == []
    assert (result["completed"], result["failed"]) == (5, 0)
    assert result["output_lens"] == [4] * 5 and result["errors"] == [""] * 5
    assert [len(gaps) for gaps in result["itls"]] == [3] * 5
    # seconds, as vLLM writes them (the scripted 30 ms; in milliseconds they would be >= 25)
    assert all(0.025 < t < 5 for t in result["ttfts"])
    assert 25 < result["median_ttft_ms"] < 5000
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    config = result["config"]
    assert config["workload"]["num_prompts"] == 5
    assert config["slo"]["ttft_ms"] == 5000 and config["traffic"]["request_rate"] == "inf"
    assert config["client"]["model"] == "fake-model" and "api_key" not in config["client"]
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Mean TTFT (ms):" in printed
    assert "Request goodput (req/s):" in printed


def test_request_bodies_follow_the_openai_streaming_contract() -> None:
    with FakeChatServer(FAST) as server:
        base = server.base_url + "/v1/"  # a base URL that already names /v1 works too
        assert main(_args(server, "--base-url", base, "--num-prompts", "2", "--random-output-len", "3")) == 0
        bodies = server.log.bodies
    for body in bodies:
        assert body["model"] == "fake-model" and body["max_tokens"] == 3
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["temperature"] == 0
        assert body["messages"][0]["role"] == "user"


def test_jsonl_dataset_sends_the_file_requests(tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    line = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2, "temperature": 0.7}
    data.write_text(json.dumps(line) + "\n")
    with FakeChatServer(FAST) as server:
        rc = main(_args(server, "--dataset", "jsonl", "--dataset-path", str(data), "--num-prompts", "3"))
        bodies = server.log.bodies
    assert rc == 0 and len(bodies) == 3
    assert all(b["messages"] == line["messages"] and b["max_tokens"] == 2 for b in bodies)
    assert all(b["temperature"] == 0.7 and "ignore_eos" not in b for b in bodies)  # jsonl: EOS honoured


def test_sweep_finds_the_highest_rate_within_the_slo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A server that serves one request at a time (40 ms each) keeps up with 5 and 10 req/s
    but not with 200 req/s, where requests queue and TTFT blows past 80 ms."""
    pytest.importorskip("matplotlib")
    script = Script(ttft_s=(0.03,), itl_s=0.01, max_parallel=1)
    out, plots = tmp_path / "sweep.json", tmp_path / "plots"
    argv = ["--num-prompts", "5", "--random-output-len", "2", "--burstiness", "100", "--sweep-rates", "5,10,200"]
    with FakeChatServer(script) as server:
        rc = main(_args(server, *argv, "--slo", "ttft_ms=80", "--output", str(out), "--plot", str(plots)))
    assert rc == 0
    result = json.loads(out.read_text())
    assert [run["request_rate"] for run in result["runs"]] == [5, 10, 200]
    assert [run["meets_slo"] for run in result["runs"]] == [True, True, False]
    assert result["best_rate"] == 10
    assert all(run["completed"] == 5 for run in result["runs"])
    assert "Highest rate meeting the SLOs (attainment >= 90%): 10 req/s" in capsys.readouterr().out
    names = {"ttft_cdf.png", "tpot_cdf.png", "sweep_throughput.png", "sweep_latency.png"}
    names |= {f"timeline_rate{rate}.png" for rate in (5, 10, 200)}  # TTFT and server queue over each run
    assert {p.name for p in plots.iterdir()} == names
    for name in names:
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and image.size[0] >= 300


def test_plot_writes_cdf_pngs_for_a_single_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with FakeChatServer(FAST) as server:
        assert main(_args(server, "--num-prompts", "4", "--random-output-len", "3", "--plot", str(tmp_path))) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timeline_rateinf.png", "tpot_cdf.png", "ttft_cdf.png"]
    with Image.open(tmp_path / "ttft_cdf.png") as image:
        assert image.format == "PNG"


def test_python_dash_m_bench_runs(tmp_path: Path) -> None:
    with FakeChatServer(FAST) as server:
        argv = _args(server, "--num-prompts", "2", "--random-output-len", "2", "--output", str(tmp_path / "r.json"))
        proc = subprocess.run(
            [sys.executable, "-m", "bench", *argv], capture_output=True, text=True, timeout=60, cwd=REPO
        )
    assert proc.returncode == 0, proc.stderr
    assert "Serving Benchmark Result" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["completed"] == 2


@pytest.mark.parametrize(
    "base",
    ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/", "http://h:8000/v1/chat/completions"],
)
def test_every_base_url_form_reaches_chat_completions(base: str) -> None:
    assert ClientConfig(base_url=base).chat_url == "http://h:8000/v1/chat/completions"
    assert ClientConfig(base_url=base).models_url == "http://h:8000/v1/models"


def test_slo_options_parse_into_milliseconds() -> None:
    assert parse_slo(["ttft_ms=200", "tpot_ms=50.5", "e2el_ms=3000"]) == {
        "ttft_ms": 200.0,
        "tpot_ms": 50.5,
        "e2e_ms": 3000.0,
    }
    with pytest.raises(ValueError, match="ttft_ms"):
        parse_slo(["ttft=200"])
