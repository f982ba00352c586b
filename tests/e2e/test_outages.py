"""Outages: Redis restarted under load behind `epd serve` (503s with Retry-After and OpenAI's error
shape while it is down, every request served right once it is back, nodes and layouts registered
again by themselves); an encoder killed while requests are routed to it (each is tried once more on
the other encoder and answered); a cluster on a Redis with TLS and a password."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from disagg_support import Harness
from openai_support import start_until_line
from support import IMAGE, chat_prompt, noise_image

from deploy.procs import Cluster
from deploy.redis_proc import PrivateRedis, find_redis_server, free_port

TTL = ["--heartbeat-ttl", "2", "--kv-timeout", "30"]
BODY = {"model": "m", "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 6,
        "temperature": 0, "ignore_eos": True}


def _load(url: str, stop: threading.Event, results: list) -> None:
    """Requests one after another until `stop`: (time, status, Retry-After, body)."""
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            r = client.post(f"{url}/v1/chat/completions", json=BODY)
            results.append((time.monotonic(), r.status_code, r.headers.get("retry-after"), r.json()))


def test_redis_restart_under_load(tmp_path):
    redis = PrivateRedis().start()
    cmd = [sys.executable, "-m", "epd.cli", "serve", "--model", "tiny-random", "--port", "0", "--device", "cpu",
           "--redis-url", redis.url, "--log-dir", str(tmp_path / "logs"), "--served-model-name", "m",
           "--log-level", "warning"]   # the nodes' default TTL: they beat every 2 s
    proc, log, line = start_until_line(cmd, "EPD ready on ", 300, "epd serve")
    url = line.split()[3].removesuffix("/v1")
    results: list = []
    stop = threading.Event()
    worker = threading.Thread(target=_load, args=(url, stop, results))
    try:
        worker.start()
        time.sleep(3)
        redis.stop()
        down_at = time.monotonic()
        time.sleep(4)
        restart_at = time.monotonic()   # from here Redis may answer, empty, before the nodes register again
        redis = PrivateRedis(redis.port, redis.password).start()
        up_at = time.monotonic()
        time.sleep(8)
        stop.set()
        worker.join(60)
        during = [r for r in results if down_at + 1.5 < r[0] < restart_at]
        odd = [r for r in results if r[0] > down_at + 1.5 and r[1] != 200
               and not (r[1] == 503 and r[2] and r[3]["error"]["code"] == "redis_unavailable")]
        assert during and not odd, odd[:3]   # an empty Redis back before the nodes beat again: no "no_capacity"
        back = next(i for i, r in enumerate(results) if r[0] > restart_at and r[1] == 200)
        after = results[back:]
        assert results[back][0] < up_at + 3 and after[-1][0] > up_at + 5   # back within a few refreshes
        assert all(status == 200 for _, status, _, _ in after), after[:3]   # from the first success on
        answers = {body["choices"][0]["message"]["content"] for _, status, _, body in results if status == 200}
        assert len(answers) == 1, "every served request is the same greedy answer"
        assert {status for _, status, _, _ in results} <= {200, 503}, "no 500s"
        assert httpx.get(f"{url}/health").status_code == 200
        router_log = (tmp_path / "logs" / "router.log").read_text()
        assert router_log.count("Redis is unavailable") <= 2 and "Traceback" not in router_log
    finally:
        stop.set()
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        redis.stop()


def test_a_request_whose_encoder_dies_is_answered_by_the_other_encoder(tiny_models, tmp_path):
    redis = PrivateRedis().start()
    cluster = Cluster(tiny_models["qwen2_vl"], redis.url, str(tmp_path), common_args=TTL)
    try:
        for role in ("encoder", "encoder", "prefill", "decode"):
            cluster.add(role)
        cluster.wait_ready()
        harness = Harness(cluster, redis.url)
        victim = cluster.nodes[0]
        cluster.kill(victim)              # still registered for up to its TTL: requests go to it
        results = [harness.generate(chat_prompt(IMAGE, f"Describe picture {i}."), [noise_image(80, 60, seed=i)],
                                    max_new_tokens=4) for i in range(3)]
        assert [r.error for r in results] == ["", "", ""]
        assert all(len(r.token_ids) == 4 for r in results)
        harness.assert_pools_intact()
        harness.close()
    finally:
        cluster.stop()
        redis.stop()


def _tls_redis(tmp_path) -> tuple[subprocess.Popen, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    port, password = free_port(), "tls-pass-" + os.urandom(4).hex()
    proc = subprocess.Popen([find_redis_server(), "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                             "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                             "--requirepass", password, "--save", "", "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=none"


def test_a_cluster_on_redis_with_tls_and_a_password(tiny_models, tmp_path):
    if subprocess.run(["which", "openssl"], capture_output=True).returncode:
        pytest.skip("no openssl to make a certificate")
    server, url = _tls_redis(tmp_path)
    cluster = Cluster(tiny_models["qwen2_vl"], url, str(tmp_path), common_args=TTL)
    try:
        for role in ("prefill", "decode"):
            cluster.add(role)
        cluster.wait_ready()
        harness = Harness(cluster, url)
        result = harness.generate(chat_prompt("Hello there."), max_new_tokens=4)
        assert not result.error and len(result.token_ids) == 4
        harness.close()
    finally:
        cluster.stop()
        server.kill()
