"""`epd serve` checks every option, and its port, before it starts anything: a misplaced option
costs no node start-up, a busy port no "ready" from another server."""

from __future__ import annotations

import socket
import time

import pytest

from deploy import serve


@pytest.mark.parametrize(("extra", "says"), [
    (["--no-such-option", "1"], "epd router: unrecognized arguments: --no-such-option 1"),
    (["--node-args=--no-such-node-option"], "epd encoder: unrecognized arguments: --no-such-node-option"),
    (["--chat-template", "no-such-template"], "unknown chat template 'no-such-template'"),
    (["--mm-processor-kwargs", '{"max_pixels": 1}'], "--mm-processor-kwargs is not supported"),
    (["--max-model-len", "x"], "argument --max-model-len: invalid int value: 'x'"),
    (["--device", "cpu", "--node-args=--device gpu1"], "'gpu1' is not a device (cpu, cuda or cuda:N)"),
    (["--gpus", "0,1"], "--gpus places nodes on GPUs; there are none here"),
])
def test_a_wrong_option_is_refused_before_any_process_starts(tiny_models, tmp_path, capsys, extra, says):
    started = time.monotonic()
    code = serve.main(["--model", tiny_models["qwen2_vl"], "--log-dir", str(tmp_path / "logs"), "--port", "0",
                       *extra])
    assert code == 2
    assert says in capsys.readouterr().err
    assert time.monotonic() - started < 15
    assert not (tmp_path / "logs").exists()       # no node, no Redis, no log was started


def test_a_port_another_server_holds_is_refused_at_once(tiny_models, tmp_path, capsys):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        code = serve.main(["--model", tiny_models["qwen2_vl"], "--log-dir", str(tmp_path / "logs"),
                           "--port", str(port)])
    assert code == 2
    assert f"cannot serve on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_the_router_gets_a_process_per_four_cores_unless_told():
    """One router process relaying 16 image requests a second was the split's wall on a 16-core GPU
    host (BENCHMARKS.md): epd serve runs one per 4 cores, 1 to 4, and --api-server-count decides
    when given."""
    import argparse

    assert [serve.router_processes(n) for n in (1, 2, 7, 8, 16, 64)] == [1, 1, 1, 2, 4, 4]
    args = argparse.Namespace(host="127.0.0.1", model="m")
    cmd = serve._router_cmd(args, "m", 8000, [], "s")
    assert cmd[cmd.index("--api-server-count") + 1] == str(serve.router_processes())
    mine = serve._router_cmd(args, "m", 8000, ["--api-server-count", "3"], "s")
    assert mine.count("--api-server-count") == 1 and mine[mine.index("--api-server-count") + 1] == "3"
