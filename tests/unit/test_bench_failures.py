"""Server errors become failed requests with their message; the run always finishes."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from bench_fake_server import FakeChatServer, Script, run_harness

from bench.cli import main


def test_http_500_error_event_and_dropped_stream_are_failures() -> None:
    script = Script(ttft_s=(0.05,), itl_s=0.005, modes=("ok", "http500", "error_event", "drop"))
    with FakeChatServer(script) as server:
        # the 4 warm-up requests take one turn of the modes and are not counted
        result, m = run_harness(server.base_url, 8, output_len=6, warmup=4)
    assert (m.completed, m.failed) == (2 * 1, 2 * 3)
    errors = sorted(out.error for out in result.outputs if not out.success)
    assert sum("HTTP 500" in e and "scripted internal error" in e for e in errors) == 2
    assert sum("scripted error event" in e for e in errors) == 2
    assert sum("peer closed connection" in e for e in errors) == 2  # cut mid-body
    assert all(out.error == "" for out in result.outputs if out.success)
    # figures describe only the successful requests
    assert (m.ttft.count, m.itl.count, m.e2el.count) == (2, 2 * 5, 2)
    assert m.total_output_tokens == 2 * 6


def test_a_stalled_stream_times_out_without_stalling_the_run() -> None:
    with FakeChatServer(Script(ttft_s=(0.02,), itl_s=0.002, modes=("ok", "stall"), stall_s=5)) as server:
        result, m = run_harness(server.base_url, 4, output_len=3, timeout_s=0.5)
    assert (m.completed, m.failed) == (2, 2)
    assert [out.error for out in result.outputs if not out.success] == ["timed out after 0.5 s"] * 2
    assert m.duration < 1.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_exits_nonzero_with_errors_in_json(tmp_path: Path) -> None:
    out_file = tmp_path / "result.json"
    argv = ["--base-url", f"http://127.0.0.1:{_free_port()}", "--model", "m", "--num-prompts", "3"]
    assert main([*argv, "--no-progress", "--output", str(out_file)]) == 1
    result = json.loads(out_file.read_text())
    assert (result["completed"], result["failed"]) == (0, 3)
    assert all("ConnectError" in e for e in result["errors"])
    assert result["mean_ttft_ms"] == 0 and result["request_throughput"] == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [('{"messages": []}\n{"prompt": "hello"}\n', "bad.jsonl:2: each line needs a 'messages' list"),
     ('{"messages": [}\n', "bad.jsonl:1: not JSON"), (None, "cannot read")],
)  # fmt: skip
def test_a_bad_jsonl_dataset_is_refused_before_any_request(
    tmp_path: Path, content: str | None, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.jsonl"
    if content is not None:
        data.write_text(content)
    assert main(["--model", "m", "--dataset", "jsonl", "--dataset-path", str(data), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        ["--random-range-ratio", "1.5"],
        ["--slo", "latency=3"],
        ["--image-resolution", "big"],
        ["--max-concurrency", "0"],
    ],
)
def test_bad_options_exit_with_usage_error(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--model", "m", *extra])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
