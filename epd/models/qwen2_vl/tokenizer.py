"""The tokenizer of random Qwen2-VL checkpoints: byte-level BPE with Qwen2-VL's real special tokens
(at full size Qwen's own numbering, `<|endoftext|>` = 151643). The chat template is our own
Jinja rendering of the ChatML format Qwen2-VL uses, with one
`<|vision_start|><|image_pad|><|vision_end|>` per image part.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from epd.models.tiny_tokenizer import build_bpe

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


def build_tokenizer(base_vocab_size: int, seed: int = 0) -> Tokenizer:
    """Qwen's special tokens at ids base_vocab_size, base_vocab_size + 1, ..."""
    return build_bpe(base_vocab_size, seed, QWEN_SPECIAL_TOKENS)


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
