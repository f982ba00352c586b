"""Page pool bookkeeping, incremental detokenization and the tiny-model checkpoint writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from epd.engine.detokenizer import IncrementalDetokenizer
from epd.engine.kv_pool import OutOfPagesError, PagePool


def test_pages_are_handed_out_once_and_freed_once():
    pool = PagePool(num_pages=9, page_size=4)
    a, b = pool.allocate(3), pool.allocate(5)
    assert 0 not in a + b, "page 0 is the reserved dummy"
    assert len(set(a + b)) == 8 and pool.num_free == 0
    with pytest.raises(OutOfPagesError):
        pool.allocate(1)
    pool.free(a)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(a[:1])
    pool.free(b)
    pool.check_integrity()
    assert pool.num_free == pool.capacity == 8


def test_integrity_check_catches_a_corrupted_free_list():
    pool = PagePool(num_pages=5, page_size=4)
    pages = pool.allocate(2)
    pool._free.append(pages[0])  # simulate a bug: a page both free and in use
    with pytest.raises(AssertionError, match="both free and in use"):
        pool.check_integrity()


def test_detokenizer_streams_the_same_text_and_holds_back_stop_prefixes(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["qwen2_vl"])
    text = "Hello world, the red cat sat. Ünïcödé ✓ done"
    ids = tok.encode(text, add_special_tokens=False)
    plain = IncrementalDetokenizer(tok)
    streamed = "".join(plain.push(i) for i in ids) + plain.finish()
    assert streamed == tok.decode(ids) == text
    stopper = IncrementalDetokenizer(tok, stop=("sat.",))
    pieces = [stopper.push(i) for i in ids]
    assert "".join(pieces) + stopper.finish() == "Hello world, the red cat "
    assert stopper.stopped == "sat."
    assert not any("sat" in p for p in pieces)


@pytest.mark.parametrize("skip_special", [True, False])
def test_detokenizer_fast_path_streams_what_the_tokenizer_decodes(tiny_models, skip_special):
    """The detokenizer calls the Rust decoder directly; the text must be what transformers'
    `decode` gives, with special tokens and multi-byte characters split across tokens."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["qwen2_5_vl"])
    ids = tok.encode("<|im_start|>Ünïcödé ✓ 猫が座った<|im_end|> done<|vision_start|>", add_special_tokens=False)
    rng = random.Random(0)
    ids += [rng.randrange(len(tok)) for _ in range(60)]
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special)
    assert detok._raw is not None, "the fast path is not taken for the checkpoint's tokenizer"
    streamed = "".join(detok.push(i) for i in ids) + detok.finish()
    assert streamed == tok.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)


def test_tiny_model_cli_writes_a_complete_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-m", "epd.cli", "tiny-model", "qwen2_5_vl", str(out), "--seed", "3"],
                   check=True, capture_output=True)
    names = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "preprocessor_config.json"} <= names
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    for name in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert len(tok.encode(name, add_special_tokens=False)) == 1
    assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg["image_token_id"]
    assert tok.convert_tokens_to_ids("<|vision_start|>") == cfg["vision_start_token_id"]
    rendered = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                        "text": "hi"}]}],
                                       tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")


def test_full_size_preset_config_has_real_dimensions():
    from epd.models.qwen2_vl.tiny import build_config

    cfg = build_config("qwen2_5_vl", "7b", 151643)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (3584, 28, 4)
    assert cfg["image_token_id"] == 151655 and cfg["vision_start_token_id"] == 151652
