"""`epd serve` as a user runs it: one command starts a private Redis, an encoder, a prefill and a
decode process and the router; the real `openai` client talks to it. Greedy output is checked
token for token against `transformers`, a dropped stream must free pages on every node, and
Ctrl-C must leave no process behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from openai_support import (
    IDS,
    assert_matches,
    data_uri,
    image_part,
    reference,
    serve_media,
    start_until_line,
    token_ids,
)
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import parse_exposition

KEY = "serve-key"
MODEL = "tiny-serve"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Serve:
    proc: subprocess.Popen
    url: str
    model_path: str
    log: list[str]
    ready_s: float
    log_dir: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def metrics(self) -> dict:
        return parse_exposition(httpx.get(f"{self.url}/metrics").text)

    def gauge(self, name: str, pool: str | None = None) -> float:
        labels = (("model_name", MODEL),) + ((("pool", pool),) if pool else ())
        return self.metrics()[(f"epd:{name}", labels)]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    with serve_media(tmp_path_factory.mktemp("serve-media")) as served:
        yield served


@pytest.fixture(scope="module")
def serve(tiny_models, media, tmp_path_factory):
    path = tiny_models["qwen2_5_vl"]
    log_dir = tmp_path_factory.mktemp("serve-logs")
    cmd = [sys.executable, "-m", "epd.cli", "serve", "--model", path, "--port", "0", "--device", "cpu",
           "--log-dir", str(log_dir), "--served-model-name", MODEL, "--api-key", KEY,
           "--log-stats-interval", "1", "--node-args=--log-stats-interval 1"]
    t0 = time.monotonic()
    proc, log, line = start_until_line(cmd, "EPD ready on ", 240, "epd serve")
    server = Serve(proc, line.split()[3].removesuffix("/v1"), path, log, time.monotonic() - t0, log_dir)
    print(f"\nepd serve ready after {server.ready_s:.1f}s: {line.strip()}")
    yield server
    if proc.poll() is None:
        proc.kill()


def chat(serve: Serve, content, max_tokens: int = 10, **kw):
    return serve.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0, **kw)


def test_image_url_and_data_uri_interleaved_equal_transformers(serve, media):
    content = [{"type": "text", "text": "Compare"}, image_part(media.url("a.png")), {"type": "text", "text": "with"},
               image_part(data_uri(media.images["b.png"])), {"type": "text", "text": "please."}]
    whole = chat(serve, content, **IDS)
    prompt_ids, expected = reference(serve.model_path, content, [media.images["a.png"], media.images["b.png"]], 10)
    assert_matches(whole, prompt_ids, expected)
    assert whole.epd_prompt_tokens["image_tokens"] > 0
    chunks = list(chat(serve, content, stream=True, stream_options={"include_usage": True}))
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == whole.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), 10)
    timings = chunks[-1].model_extra["epd_timings"]
    assert timings["encode_ms"] > 0 and timings["prefill_ms"] > 0 and "transfer_ms" in timings


def test_single_image_and_text_only_equal_transformers(serve, media):
    one = [image_part(media.url("b.png")), {"type": "text", "text": "Describe it."}]
    prompt_ids, expected = reference(serve.model_path, one, [media.images["b.png"]], 10)
    assert_matches(chat(serve, one, **IDS), prompt_ids, expected)
    text = [{"type": "text", "text": "Write a short poem about the sea."}]
    prompt_ids, expected = reference(serve.model_path, text, [], 10)
    assert_matches(chat(serve, text, **IDS), prompt_ids, expected)


def test_models_health_and_metrics_show_every_pool(serve):
    assert [m.id for m in serve.client().models.list().data] == [MODEL]
    health = httpx.get(f"{serve.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"
    for pool in ("encoder", "prefill", "decode"):
        assert serve.gauge("pool_size", pool) == 1
        assert serve.gauge("node_integrity_failures", pool) == 0
    assert serve.gauge("node_kv_pages_total", "decode") > 0 and serve.gauge("node_kv_pages_total", "prefill") > 0
    before = serve.metrics().get(("epd:generation_tokens_total", (("model_name", MODEL),)), 0)
    chat(serve, "Count to five.", max_tokens=5, extra_body={"ignore_eos": True})
    assert serve.gauge("generation_tokens_total") == before + 5


MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"


def monitoring_queries() -> set[str]:
    """Every series name the dashboard, the alert rules and the KEDA example under deploy/ query."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [r["expr"] for g in yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())["groups"]
              for r in g["rules"]]
    exprs += [t["metadata"]["query"] for obj in yaml.safe_load_all((MONITORING / "keda-scaledobject.yaml").read_text())
              for t in obj["spec"]["triggers"]]
    return {name for e in exprs for name in re.findall(r"\b(?:vllm|epd):[a-z0-9_]+", e)}


def scrape(serve: Serve) -> dict[str, tuple[str, float]]:
    """/metrics read by prometheus_client: {sample name: (family type, the family's count)}: a
    histogram's count of observations, a counter's total, a gauge's value (summed over labels)."""
    out: dict[str, tuple[str, float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{serve.url}/metrics").text):
        names = {s.name for s in family.samples}
        count = sum(s.value for s in family.samples if family.type != "histogram" or s.name.endswith("_count"))
        out.update({name: (family.type, count) for name in names})
    return out


def test_every_series_deploy_monitoring_queries_is_served_and_moves(serve):
    queried = monitoring_queries()
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:e2e_request_latency_seconds_bucket",
            "vllm:request_queue_time_seconds_bucket", "vllm:prefix_cache_queries_total"} <= queried
    before = scrape(serve)
    vllm_names = {name for name in queried if name.startswith("vllm:")}
    assert not vllm_names - before.keys(), f"not served from the start: {sorted(vllm_names - before.keys())}"
    chat(serve, "Count to five.", max_tokens=5, extra_body={"ignore_eos": True})
    after = scrape(serve)
    assert not queried - after.keys(), f"queried but not served: {sorted(queried - after.keys())}"
    may_stay = {"epd:request_failure_total", "vllm:num_preemptions_total", "vllm:prefix_cache_hits_total"}
    stayed = [name for name in queried - may_stay if after[name][0] in ("counter", "histogram")
              and after[name][1] <= before.get(name, ("", 0.0))[1]]
    assert not stayed, f"did not move over a request: {stayed}"
    assert after["vllm:generation_tokens_total"][1] == before["vllm:generation_tokens_total"][1] + 5


def _with_image(url: str) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": [image_part(url)]}]}


@pytest.mark.parametrize("make_body, status, text", [
    (lambda m: {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    (lambda m: b'{"model": "tiny-serve", "messages": [', 400, "not valid JSON"),
    (lambda m: {"model": MODEL}, 400, "Field required"),
    (lambda m: _with_image("http://127.0.0.1:9/x.png"), 400, "URL fetch failed"),
    (lambda m: _with_image(m.url("not-an-image.png")), 400, "not a recognised image format"),
], ids=["unknown_model", "malformed_json", "missing_messages", "unreachable_url", "non_image_bytes"])
def test_errors_are_openai_shaped_and_serving_goes_on(serve, media, make_body, status, text):
    body = make_body(media)
    kw = {"content": body, "headers": {**AUTH, "Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": AUTH}
    resp = httpx.post(f"{serve.url}/v1/chat/completions", timeout=30, **kw)
    assert resp.status_code == status and text in resp.json()["error"]["message"], resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert chat(serve, "still there?", max_tokens=2).usage.completion_tokens == 2


def test_logit_bias_over_the_pools_equals_transformers(serve, media):
    """logit_bias crosses the router, prefill and decode processes (msgpack) and gives what
    transformers gives with the same bias: the answer's first token banned, another favoured."""
    content = [image_part(media.url("a.png")), {"type": "text", "text": "Describe it."}]
    plain = token_ids(chat(serve, content, max_tokens=8, **IDS))
    bias = {plain[0]: -100.0, plain[2]: 4.0}
    prompt_ids, expected = reference(serve.model_path, content, [media.images["a.png"]], 8, logit_bias=bias)
    biased = chat(serve, content, max_tokens=8, logit_bias={str(t): b for t, b in bias.items()}, **IDS)
    assert_matches(biased, prompt_ids, expected, max_tokens=8)
    assert token_ids(biased) != plain


def test_the_prefill_node_caches_prefixes_with_their_images(serve, media):
    """The same image and question again: the prefill node takes the cached pages (the image's
    too: the router passes its content hash along) and the answer is still transformers'."""
    content = [image_part(media.url("b.png")), {"type": "text", "text": "Which colour is it mostly?"}]
    chat(serve, content, **IDS)
    again = chat(serve, content, **IDS)
    prompt_ids, expected = reference(serve.model_path, content, [media.images["b.png"]], 10)
    assert_matches(again, prompt_ids, expected)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert again.epd_prompt_tokens["image_tokens"] < cached < len(prompt_ids)


def test_response_format_over_the_pools(serve, media):
    """The prefill node samples the first token under the grammar, the decode node the rest."""
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "size"],
              "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["small", "large"]}}}
    content = [image_part(media.url("a.png")), {"type": "text", "text": "As JSON:"}]
    resp = chat(serve, content, max_tokens=30,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    value = json.loads(resp.choices[0].message.content)
    assert list(value) == ["ok", "size"] and isinstance(value["ok"], bool) and value["size"] in ("small", "large")
    assert resp.choices[0].finish_reason == "stop"


def test_min_tokens_holds_from_the_first_token_over_the_pools(serve):
    """The prefill node samples the first token, and min_tokens bans the stop tokens there too:
    with every stop token favoured by +100, the answer still has min_tokens tokens before one."""
    from epd.config import ModelConfig

    eos = ModelConfig.from_pretrained(serve.model_path).eos_token_ids
    resp = chat(serve, "Say something.", max_tokens=8,
                extra_body={"min_tokens": 3, "logit_bias": {str(t): 100 for t in eos}})
    assert resp.usage.completion_tokens == 4 and resp.choices[0].finish_reason == "stop"   # 3, then a stop


def test_n_choices_over_the_pools(serve, media):
    """n = 2 with an image: two requests through encoder, prefill and decode, the same greedy
    answer as n = 1, streamed with both indices; every page back afterwards."""
    content = [image_part(media.url("b.png")), {"type": "text", "text": "Describe it."}]
    one = chat(serve, content, max_tokens=6)
    two = chat(serve, content, max_tokens=6, n=2)
    assert [c.message.content for c in two.choices] == [one.choices[0].message.content] * 2
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens
    streamed = {0: "", 1: ""}
    for chunk in chat(serve, content, max_tokens=6, n=2, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == {0: one.choices[0].message.content, 1: one.choices[0].message.content}
    for pool in ("prefill", "decode"):
        wait_for_pages(serve, pool, busy=False)


def wait_for_pages(serve: Serve, pool: str, busy: bool, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        in_use = serve.gauge("node_kv_pages_in_use", pool)
        if (in_use > 0) == busy:
            return in_use
        time.sleep(0.1)
    raise AssertionError(f"{pool} pages in use still {in_use} after {timeout}s (wanted busy={busy})")


def test_client_disconnect_mid_stream_frees_pages_on_every_node(serve, media):
    body = {"model": MODEL, "stream": True, "max_tokens": 2000, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": [image_part(media.url("a.png")), {"type": "text", "text": "Go"}]}]}
    with httpx.stream("POST", f"{serve.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        seen = 0
        while seen < 5:
            seen += '"content"' in next(lines)
        assert wait_for_pages(serve, "decode", busy=True) > 0
    for pool in ("prefill", "decode"):
        wait_for_pages(serve, pool, busy=False)
        assert serve.gauge("node_integrity_failures", pool) == 0
    assert serve.gauge("num_requests_running") == 0
    assert chat(serve, "and again", max_tokens=3).usage.completion_tokens == 3


def test_the_console_shows_the_served_name_and_a_stats_line_while_serving(serve):
    """As vLLM's console: throughput, running, waiting and KV use every few seconds (here every 1 s)
    while requests are served; each node's log has its own line."""
    ready = next(line for line in serve.log if line.startswith("EPD ready on "))
    assert f"(model {MODEL};" in ready
    start = len(serve.log)
    assert chat(serve, "Count to twenty.", max_tokens=40, extra_body={"ignore_eos": True}).usage.completion_tokens == 40
    deadline = time.monotonic() + 10
    pattern = re.compile(r"epd\.stats: router: prompt throughput \(tokens\) [\d.]+/s, generation throughput "
                         r"\(tokens\) ([\d.]+)/s, running \d+, waiting \d+, KV usage [\d.]+%")
    while not any((m := pattern.search(line)) and float(m.group(1)) > 0 for line in serve.log[start:]):
        assert time.monotonic() < deadline, "no stats line with generated tokens:\n" + "".join(serve.log[-20:])
        time.sleep(0.2)
    logs = {p.name: p.read_text() for p in serve.log_dir.glob("*.log")}
    for role, counted in (("prefill", "prompt tokens"), ("decode", "generation tokens"), ("encoder", "images")):
        text = next(t for name, t in logs.items() if name.startswith(role))
        assert re.search(rf"epd\.stats: {role} node \S+: {counted} [\d.]+/s", text), text[-2000:]


def test_ctrl_c_stops_every_process(serve):
    """Last in this module: it ends the server."""
    children = descendants(serve.proc.pid)
    assert len(children) >= 5   # redis, encoder, prefill, decode, router
    serve.proc.send_signal(signal.SIGINT)
    assert serve.proc.wait(60) == 0, "".join(serve.log[-20:])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in children):
        time.sleep(0.1)
    left = [pid for pid in children if os.path.exists(f"/proc/{pid}")]
    assert not left, f"processes left behind after Ctrl-C: {left}"
