"""A byte-level BPE tokenizer with Qwen2-VL's real special tokens, for random test checkpoints.

The merges are trained on a synthetic corpus in milliseconds; the vocabulary is then padded with
filler tokens so the special tokens land on the ids the preset asks for (for the full-size
presets that is Qwen's own numbering, `<|endoftext|>` = 151643). The chat template is our own
Jinja rendering of the ChatML format Qwen2-VL uses, with one
`<|vision_start|><|image_pad|><|vision_end|>` per image part.
"""

from __future__ import annotations

import json
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# In Qwen's order, so that with a base vocabulary of 151643 the ids equal the real ones.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


def _synthetic_corpus(seed: int, num_sentences: int = 3000) -> list[str]:
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiou"] + ["the", "and", "of", "is"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    words += ["image", "describe", "what", "picture", "color", "red", "blue", "cat", "dog", "hello"]
    out = []
    for _ in range(num_sentences):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        out.append(sentence.capitalize() + rng.choice([".", "?", "!", ","]))
    return out


def build_tokenizer(base_vocab_size: int, seed: int = 0) -> Tokenizer:
    """Byte-level BPE whose special tokens get ids base_vocab_size, base_vocab_size + 1, ..."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(base_vocab_size, 2000),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_synthetic_corpus(seed), trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    if len(vocab) > base_vocab_size:
        raise ValueError(f"base vocabulary {base_vocab_size} is smaller than the trained {len(vocab)}")
    filler = 0
    while len(vocab) < base_vocab_size:  # unreachable by merges, still decodable
        vocab[f"\u0120fill{filler}"] = len(vocab)
        filler += 1
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str, model_max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    fast.save_pretrained(out_dir)
