"""Tensor parallelism on a CPU: `tensor_parallel_size=2` runs the language model over two gloo
processes (the engine and one `epd.engine.tp_worker`) and gives the one-process engine's tokens,
token for token (float32), for Qwen2.5-VL, LLaVA, Llama 4 (its experts placed, two per
process) and Llama-3.2-Vision (its image rows' K/V made by every process for its heads): text,
images, and a batch of both, with prompts longer than a step so prefill runs in
chunks. The one-process engine equals transformers in the families' own tests. A size that does
not divide the model is refused naming both numbers, and the worker processes end with the engine.
Split over pools, a prefill node of two processes hands over to decode nodes of one and of two
(the image rows too, for Llama-3.2-Vision).
"""

from __future__ import annotations

import re

import pytest
from support import IMAGE, family_prompt, noise_image

from epd import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 8}
FAMILIES = ["qwen2_5_vl", "llava", "llama4", "mllama"]


def _requests(llm: Engine) -> tuple[list[str], list[list | None]]:
    text = family_prompt(llm.tokenizer, "Tell me a long story about a red cat and a lighthouse by the sea, please.")
    one = family_prompt(llm.tokenizer, IMAGE, "Describe this picture.")
    two = family_prompt(llm.tokenizer, "First:", IMAGE, " and second:", IMAGE, " which is bluer?")
    images = [None, [noise_image(120, 80, seed=1)], [noise_image(64, 64, seed=2), noise_image(90, 150, seed=3)]]
    return [text, one, two], images


def _run(path: str, tp: int) -> tuple[list[list[int]], list[list[int]]]:
    """(each request alone, the three as one batch) token ids."""
    with Engine(model_path=path, device="cpu", tensor_parallel_size=tp, page_size=4, max_step_tokens=40) as llm:
        prompts, images = _requests(llm)
        alone = [llm.generate(prompt=p, image_data=im, sampling_params=GREEDY)["output_ids"]
                 for p, im in zip(prompts, images, strict=True)]
        batch = [o["output_ids"] for o in llm.generate(prompt=prompts, image_data=images, sampling_params=GREEDY)]
        workers = llm.core.tp.workers if llm.core.tp is not None else []
    assert all(w.poll() is not None for w in workers), "the workers ended with the engine"
    return alone, batch


@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_give_one_process_tokens(tiny_models, family):
    one_alone, one_batch = _run(tiny_models[family], 1)
    two_alone, two_batch = _run(tiny_models[family], 2)
    assert two_alone == one_alone
    assert two_batch == one_batch
    assert len({tuple(t) for t in one_alone}) == 3, "the three requests differ"


def test_a_size_that_does_not_divide_the_heads_is_refused(tiny_models):
    with pytest.raises(ValueError, match=r"tensor parallel size 3 does not divide the attention heads \(4\)"):
        Engine(model_path=tiny_models["qwen2_5_vl"], device="cpu", tensor_parallel_size=3)


@pytest.mark.parametrize(("family", "decode_tp"), [("llama4", "2"), ("qwen2_5_vl", "1"), ("mllama", "2")])
def test_tensor_parallel_prefill_hands_over_to_a_decode_node(tiny_models, tmp_path, family, decode_tp):
    """1 encoder + 1 prefill node of two processes + 1 decode node of `decode_tp` (real Redis, UCX
    over TCP, pages of 4 and 16 tokens): the colocated one-process engine's tokens and text."""
    from disagg_support import disagg_cluster

    path = tiny_models[family]
    roles = {"encoder": [[]], "prefill": [["--page-size", "4", "-tp", "2"]],
             "decode": [["--page-size", "16", "-tp", decode_tp]]}
    common = ["--dtype", "float64", "--heartbeat-ttl", "2", "--max-step-tokens", "40"]
    with Engine(model_path=path, device="cpu", dtype="float64") as engine, \
            disagg_cluster(path, str(tmp_path), roles, common) as harness:
        prompts, images = _requests(engine)
        for prompt, imgs in zip(prompts, images, strict=True):
            got = harness.generate(prompt, imgs or [], max_new_tokens=8, ignore_eos=True)
            assert not got.error, got.error
            want = engine.generate(prompt=prompt, image_data=imgs,
                                   sampling_params={"temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
            assert got.token_ids == want["output_ids"] and got.text == want["text"]
        harness.assert_pools_intact()
        sizes = {s.role: s.tensor_parallel_size for s in harness.statuses().values() if s.role != "encoder"}
        assert sizes == {"prefill": 2, "decode": int(decode_tp)}, "each node reports its processes"
    logs = {role: "".join(p.read_text() for p in tmp_path.glob(f"{role}*.log")) for role in ("prefill", "decode")}
    assert "rank 1 of 2" in logs["prefill"]
    assert ("rank 1 of 2" in logs["decode"]) == (decode_tp == "2")
    # equal sizes hand over rank by rank: the leader sends its own heads only (half of the bytes)
    handed = re.findall(r"KV of \S+: (\d+) bytes handed to decode node \S+ (.*), done", logs["prefill"])
    assert handed and all(("rank by rank (2 ranks)" in via) == (decode_tp == "2") for _, via in handed), handed
    ranks = re.findall(r"rank 1: KV of \S+: (\d+) bytes \(its heads\) sent to", logs["prefill"])
    assert len(ranks) == (len(handed) if decode_tp == "2" else 0), ranks
    if family == "llama4":   # the same number of heads each: rank 1 sent what rank 0 did (mllama's image
        assert sorted(ranks) == sorted(n for n, _ in handed)   # rows go with rank 0's part)


def test_a_worker_that_dies_stops_the_engine_with_its_reason(tiny_models):
    """A rank killed under a live engine: the next step ends the process (GroupLost is a SystemExit,
    so a node's loop does not swallow it and its supervisor starts it again), naming the rank."""
    from epd.engine.tensor_parallel import GroupLost

    llm = Engine(model_path=tiny_models["qwen2_5_vl"], device="cpu", tensor_parallel_size=2)
    assert len(llm.generate(prompt="hi", sampling_params=GREEDY)["output_ids"]) == GREEDY["max_new_tokens"]
    worker = llm.core.tp.workers[0]
    worker.kill()
    worker.wait()
    with pytest.raises(GroupLost, match=r"tensor parallel rank 1 exited \(code -9\)"):
        llm.generate(prompt="hi again", sampling_params=GREEDY)


def test_the_group_listens_on_loopback_only_and_ignores_strangers(tiny_models):
    """A local process without the user's files cannot join the group (the rendezvous is a file in a
    private directory, gone once the engine stops), the group's sockets listen on loopback only, and
    bytes a stranger writes to them change no answer."""
    import os
    import socket
    import time

    psutil = pytest.importorskip("psutil")

    def listeners(pid: int) -> set:
        return {c.laddr for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN}

    before = listeners(os.getpid())   # this test process's own (other tests' servers)
    llm = Engine(model_path=tiny_models["qwen2_5_vl"], device="cpu", tensor_parallel_size=2)
    try:
        want = llm.generate(prompt="hi", sampling_params=GREEDY)["output_ids"]
        rendezvous = llm.core.tp.rendezvous
        assert os.stat(rendezvous).st_mode & 0o077 == 0
        listening = listeners(os.getpid()) - before
        for w in llm.core.tp.workers:
            listening |= listeners(w.pid)
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
        for addr in listening:
            for junk in (os.urandom(4096), b"\0" * 64):
                with socket.create_connection((addr.ip, addr.port)) as s:
                    s.sendall(junk)
                    time.sleep(0.1)
        assert llm.generate(prompt="hi", sampling_params=GREEDY)["output_ids"] == want
    finally:
        llm.shutdown()
    assert not os.path.exists(rendezvous)


def test_a_step_that_fails_on_the_leader_stops_the_group(tiny_models):
    """An error half-way through a forward on rank 0 (here: its second layer raises) leaves the other
    rank at another collective: the engine ends its workers and stops with GroupLost naming the error,
    rather than running on out of step."""
    from epd.engine.tensor_parallel import GroupLost

    llm = Engine(model_path=tiny_models["qwen2_5_vl"], device="cpu", tensor_parallel_size=2)
    workers = list(llm.core.tp.workers)

    def broken(*args, **kwargs):
        raise RuntimeError("device fault")

    llm.core.model.language_model.layers[1].forward = broken
    with pytest.raises(GroupLost, match=r"a step failed on rank 0 \(RuntimeError: device fault\)"):
        llm.generate(prompt="hi", sampling_params=GREEDY)
    assert all(w.poll() is not None for w in workers)


def _land(receiver, deadline_s: float = 20.0):
    import time

    from epd.node.handover import HandOverState

    end = time.monotonic() + deadline_s
    while receiver.poll(time.monotonic()) is HandOverState.TRANSFERRING and time.monotonic() < end:
        time.sleep(0.02)
    return receiver.state


def test_each_rank_takes_only_its_heads_from_its_peer_rank(tiny_models, monkeypatch):
    """Rank by rank (a decode node of 2 processes, real UCX): what each prefill rank sends lands in
    the same pages of its peer rank (read back through the group: every head in place); a rank's
    group of the wrong shape, or one sent by another peer, fails that request with a clear error."""
    import torch

    from epd import protocol
    from epd.engine.kv_access import PoolLayers
    from epd.engine.rank_handover import open_rank_transports
    from epd.node.handover import HandOverState
    from epd.node.rank_handover import RankWireReceiver
    from kv_transfer.auth import ClusterSecret
    from kv_transfer.transport import KVTransport

    monkeypatch.setenv("EPD_CLUSTER_SECRET", "rank-by-rank-test-secret-0123456789")
    monkeypatch.delenv("EPD_CLUSTER_SECRET_FILE", raising=False)
    secret = ClusterSecret.load()
    llm = Engine(model_path=tiny_models["qwen2_5_vl"], device="cpu", tensor_parallel_size=2, page_size=4)
    try:
        leader = llm.core.tp
        (rank1,) = open_rank_transports(leader, "127.0.0.1", "127.0.0.1", "", "thread")
        layers = PoolLayers(list(llm.core.kv.layers), None, leader)
        _, _, _, heads, dim = layers.layers[0].shape
        n, pages, dtype = 6, [1, 2], layers.layers[0].dtype
        with KVTransport(secret=secret) as decode, KVTransport(secret=secret) as p0, \
                KVTransport(secret=secret) as p1:
            def hand_over(rid: str, rank1_wire: torch.Tensor, rank1_sender) -> RankWireReceiver:
                receiver = RankWireReceiver(decode, p0.address, rid, layers, n, peers=[p1.address], max_groups=1)
                receiver.start(None, pages)
                group = protocol.data_meta(protocol.KVGroup(rid, 0, list(range(len(layers))), 0))
                own = torch.randn(len(layers), 2, n, heads, dim, dtype=dtype)
                p0.send(decode.address, f"{rid}:kv:0", [own], meta=group).result(10)
                rank1_sender.send(rank1, f"{rid}:kv:0", [rank1_wire], meta=group)
                p0.send(decode.address, f"{rid}:meta", [], meta=protocol.data_meta(
                    protocol.HandOver(rid, first_token=1, prompt_len=n, num_groups=1))).result(10)
                _land(receiver)
                receiver.own = own
                return receiver

            theirs = torch.randn(len(layers), 2, n, heads, dim, dtype=dtype)
            good = hand_over("r-good", theirs, p1)
            assert good.state is HandOverState.DONE, good.error
            every_head = leader.gather_kv(list(range(len(layers))), pages, n)
            assert torch.equal(every_head, torch.cat([good.own, theirs], dim=3))

            wrong = hand_over("r-shape", torch.randn(len(layers), 2, n, heads + 1, dim, dtype=dtype), p1)
            assert wrong.state is HandOverState.FAILED
            assert "tensor parallel rank 1 could not take its KV heads" in wrong.error
            stranger = hand_over("r-stranger", theirs, p0)   # rank 1 takes its heads from p1 only
            assert stranger.state is HandOverState.FAILED
            assert "tensor parallel rank 1" in stranger.error
        assert len(llm.generate(prompt="hi", sampling_params=GREEDY)["output_ids"]) == GREEDY["max_new_tokens"]
    finally:
        llm.shutdown()
