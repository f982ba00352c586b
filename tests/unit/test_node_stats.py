"""The pools' gauges the router folds from its nodes' status answers: vLLM's meanings for
num_requests_waiting / kv_cache_usage_perc / num_preemptions_total, and EPD's per pool."""

from __future__ import annotations

from epd.protocol import NodeStatus
from router.metrics import RouterMetrics, parse_exposition
from router.node_stats import NodeReport, gauges


def _reports() -> dict[str, NodeReport]:
    return {
        "e0": NodeReport("encoder", NodeStatus("e0", "encoder", queues={"pending": 3, "cache_entries": 9})),
        "p0": NodeReport("prefill", NodeStatus("p0", "prefill", pages_total=100, pages_free=40, preemptions=2,
                                               queues={"awaiting_embeddings": 1, "scheduler_waiting": 4,
                                                       "prefilling": 5, "transferring": 1})),
        "p1": NodeReport("prefill", None),
        "d0": NodeReport("decode", NodeStatus("d0", "decode", pages_total=200, pages_free=50, integrity_ok=False,
                                              rejected_messages=7, queues={"awaiting_pages": 2, "running": 30})),
    }


def test_waiting_counts_every_queue_before_compute_and_running_work_does_not():
    out = gauges(_reports())
    assert out["num_requests_waiting"] == 3 + 1 + 4 + 2       # not prefilling, transferring or running
    assert out["node_requests_waiting|encoder"] == 3 and out["node_requests_waiting|prefill"] == 5
    assert out["node_requests_waiting|decode"] == 2


def test_kv_usage_is_the_decode_pools_and_pages_are_summed_per_pool():
    out = gauges(_reports())
    assert out["kv_cache_usage_perc"] == 150 / 200
    assert out["node_kv_pages_in_use|prefill"] == 60 and out["kv_cache_pages_total"] == 300
    assert out["num_preemptions_total"] == 2
    assert out["node_unresponsive|prefill"] == 1 and out["node_integrity_failures|decode"] == 1
    assert out["node_rejected_messages|decode"] == 7


def test_the_gauges_render_under_vllm_names_with_preemptions_a_counter():
    text = RouterMetrics("m").render(gauges(_reports()))
    samples = parse_exposition(text)
    model = (("model_name", "m"),)
    assert samples[("vllm:num_requests_waiting", model)] == 10
    assert samples[("vllm:kv_cache_usage_perc", model)] == 0.75
    assert samples[("epd:node_requests_waiting", (("model_name", "m"), ("pool", "encoder")))] == 3
    assert "# TYPE vllm:num_preemptions_total counter" in text
    assert ("vllm:node_requests_waiting", (("model_name", "m"), ("pool", "encoder"))) not in samples
