"""/metrics over router workers: the sum of every worker's snapshot, whichever worker renders it."""

from __future__ import annotations

from router import worker_metrics
from router.backend import BackendEvent
from router.metrics import RouterMetrics, parse_exposition


def _served(metrics: RouterMetrics, n: int, tokens: int) -> None:
    for _ in range(n):
        timer = metrics.timer()
        event = BackendEvent(1, "x", finished=True, finish_reason="length", prompt_tokens=7, completion_tokens=tokens)
        timer.token(event)
        timer.finished([event])


def test_counters_histograms_and_in_flight_add_up_over_workers(tmp_path):
    a, b = RouterMetrics("m"), RouterMetrics("m")
    _served(a, 3, 4)
    _served(b, 2, 5)
    dirs = [worker_metrics.SnapshotDir(str(tmp_path), i) for i in (0, 1)]
    stats = {"num_requests_waiting": 1.0, "requests_in_flight": 2.0, "routing_affinity_picks_total|prefill": 3.0}
    dirs[0].write(worker_metrics.snapshot(a, worker_metrics.local_stats(stats)))
    dirs[1].write(worker_metrics.snapshot(b, worker_metrics.local_stats({**stats, "requests_in_flight": 4.0})))
    snaps = dirs[1].read_all()
    merged = worker_metrics.merged(b, snaps).render(worker_metrics.merged_stats(stats, snaps))
    samples = parse_exposition(merged)
    model = (("model_name", "m"),)
    assert samples[("vllm:request_success_total", (("finished_reason", "length"), *model))] == 5
    assert samples[("vllm:generation_tokens_total", model)] == 3 * 4 + 2 * 5
    assert samples[("vllm:e2e_request_latency_seconds_count", model)] == 5
    assert samples[("vllm:num_requests_running", model)] == 2 + 4 - 1   # in flight over both, less the waiting
    assert samples[("epd:routing_affinity_picks_total", (*model, ("pool", "prefill")))] == 6
    assert samples[("vllm:num_requests_waiting", model)] == 1          # the nodes' report: not summed
    alone = parse_exposition(b.render(stats))   # the worker's own figures, without the others'
    assert alone[("vllm:request_success_total", (("finished_reason", "length"), *model))] == 2
