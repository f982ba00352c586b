"""The harness's latency, throughput and goodput figures match a server with known timing."""

from __future__ import annotations

import statistics

import pytest
from bench_fake_server import FakeChatServer, Script, run_harness

from bench.config import SLOConfig
from bench.metrics import compute_metrics

TTFT_MS, ITL_MS, TOKENS = 200.0, 20.0, 10
E2E_MS = TTFT_MS + (TOKENS - 1) * ITL_MS  # the last token lands 380 ms after the request
TOL_MS = 15.0


def test_latencies_match_the_servers_timing() -> None:
    with FakeChatServer(Script(ttft_s=(TTFT_MS / 1e3,), itl_s=ITL_MS / 1e3)) as server:
        result, m = run_harness(server.base_url, 6, output_len=TOKENS, warmup=2, max_concurrency=2)
    assert (m.completed, m.failed) == (6, 0)
    for out in result.outputs:
        assert out.ttft * 1e3 >= TTFT_MS - 2  # the clock starts before the request leaves
        assert out.e2e * 1e3 >= E2E_MS - 2
        assert len(out.itls) == TOKENS - 1  # gaps between content chunks only
        assert out.output_tokens == TOKENS  # from the usage chunk
    # A busy host's timers fire late, so the server's chunks can leave well after the script says
    # (CI once saw 200 ms become ~216). The harness must report what really happened: the
    # server's own send times plus the localhost round trip, which the client's clock includes.
    # Medians, so one scheduling hiccup of a shared CPU does not decide the test.
    sent_first = statistics.median(server.log.first_chunk_s.values()) * 1e3
    sent_last = statistics.median(server.log.last_chunk_s.values()) * 1e3
    assert sent_first >= TTFT_MS and sent_last >= E2E_MS
    assert sent_first <= m.ttft.median <= sent_first + TOL_MS
    assert sent_last <= m.e2el.median <= sent_last + TOL_MS
    assert m.itl.median == pytest.approx(ITL_MS, abs=3.0)
    assert m.itl.count == 6 * (TOKENS - 1)
    # TPOT spreads (E2E - TTFT) over the 9 tokens after the first, so its error is small
    assert m.tpot.median == pytest.approx((sent_last - sent_first) / (TOKENS - 1), abs=3.0)
    assert m.total_output_tokens == 6 * TOKENS
    assert m.total_input_tokens == 6 * Script().prompt_tokens


def test_throughput_of_an_all_at_once_run() -> None:
    """Four requests at once finish together, one E2E after the start."""
    with FakeChatServer(Script(ttft_s=(TTFT_MS / 1e3,), itl_s=ITL_MS / 1e3)) as server:
        _, m = run_harness(server.base_url, 4, output_len=TOKENS, warmup=4)
    # the run lasts from the first request out to the last usage chunk in: the server's last
    # send (measured, as a busy host's timers can run late) plus the localhost round trip
    arrivals, timed = server.log.arrivals, range(4, 8)  # the warm-up requests came first
    last_sent = max(arrivals[i] + server.log.last_chunk_s[i] for i in timed)
    run_ms = (last_sent - min(arrivals[i] for i in timed)) * 1e3
    assert E2E_MS - 2 <= run_ms <= m.duration * 1e3 <= run_ms + TOL_MS
    assert m.request_throughput == pytest.approx(4 / m.duration)
    expected = 4 / (run_ms / 1e3)  # 10.5 req/s when the server keeps to its script
    assert m.request_throughput == pytest.approx(expected, rel=0.05)
    assert m.output_throughput == pytest.approx(expected * TOKENS, rel=0.05)
    assert m.total_token_throughput == pytest.approx(expected * (TOKENS + Script().prompt_tokens), rel=0.05)


def test_goodput_counts_only_requests_within_the_slos() -> None:
    """Half the requests get a 100 ms TTFT, half 300 ms; the SLO line is at 200 ms."""
    with FakeChatServer(Script(ttft_s=(0.1, 0.3), itl_s=0.01)) as server:
        result, m = run_harness(server.base_url, 8, output_len=5, warmup=2, slo=SLOConfig(ttft_ms=200))
    assert m.completed == 8
    assert m.good_requests == 4
    assert m.request_goodput == pytest.approx(4 / m.duration)
    assert m.slo_attainment == pytest.approx(0.5)
    assert not m.meets_slo  # 50 % < the default 90 % target
    tight_tpot = compute_metrics(result, SLOConfig(tpot_ms=5))  # scripted TPOT is 10 ms
    assert tight_tpot.good_requests == 0 and tight_tpot.request_goodput == 0
    loose = compute_metrics(result, SLOConfig(ttft_ms=400, tpot_ms=30, e2e_ms=500))
    assert loose.good_requests == 8 and loose.meets_slo
    assert compute_metrics(result, SLOConfig(e2e_ms=250)).good_requests == 4


def test_server_stage_timings_and_token_split_are_reported() -> None:
    timings = {"queue_ms": 1.5, "encode_ms": 12.0, "prefill_ms": 30.0, "transfer_ms": 4.0, "decode_ms": 90.0}
    details = {"text_tokens": 20, "image_tokens": 30}
    script = Script(ttft_s=(0.02,), itl_s=0.002, epd_timings=timings, epd_prompt_tokens=details)
    with FakeChatServer(script) as server:
        _, m = run_harness(server.base_url, 5, output_len=4)
    assert set(m.epd_timings) == set(timings)
    for stage, ms in timings.items():
        assert m.epd_timings[stage].mean == pytest.approx(ms)
        assert m.epd_timings[stage].p99 == pytest.approx(ms)
        assert m.epd_timings[stage].count == 5
    assert m.total_text_input_tokens == 5 * 20
    assert m.total_vision_input_tokens == 5 * 30


def test_output_tokens_fall_back_to_content_chunks_without_usage() -> None:
    with FakeChatServer(Script(ttft_s=(0.02,), itl_s=0.002, modes=("no_usage",))) as server:
        result, m = run_harness(server.base_url, 3, output_len=7)
    assert m.completed == 3
    assert [out.output_tokens for out in result.outputs] == [7, 7, 7]
    assert m.total_text_input_tokens is None and not m.epd_timings
    # without usage the prompt length is the workload's own count (20 random words)
    assert m.total_input_tokens == 3 * 20


def test_a_server_that_ignores_stream_still_gets_measured() -> None:
    """One JSON body instead of SSE: its arrival is both first token and end of the request."""
    script = Script(ttft_s=(0.05,), modes=("json",), epd_timings={"encode_ms": 9.0})
    with FakeChatServer(script) as server:
        result, m = run_harness(server.base_url, 3, output_len=6, warmup=1)
    assert m.completed == 3 and m.total_output_tokens == 3 * 6
    for out in result.outputs:
        assert out.ttft == pytest.approx(out.e2e, abs=2e-3) and out.ttft * 1e3 >= 48
    assert m.epd_timings["encode_ms"].mean == pytest.approx(9.0)
