"""The tokenizer of random Llama-3.2-Vision checkpoints: byte-level BPE with Llama 3's special
tokens in Llama 3's order (at full size its own numbering: `<|begin_of_text|>` = 128000, ...,
256 special ids in all) and `<|image|>` right after them (128256 at full size, one past the text
model's `vocab_size`, as in the real checkpoints). The chat template is our own Jinja rendering of
the Llama 3 header format with one `<|image|>` per image part; BOS comes from the template.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from epd.models.tiny_tokenizer import build_bpe

IMAGE_TOKEN = "<|image|>"
_NAMED = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
          "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
          "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ '<|image|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def special_tokens(count: int) -> tuple[str, ...]:
    """Llama 3's first `count` special tokens: the named ones, then reserved ones numbered on."""
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + count - len(_NAMED))]
    return (_NAMED + tuple(reserved))[:count]


def build_tokenizer(base_vocab_size: int, num_special: int, seed: int = 0) -> Tokenizer:
    """Special tokens at base_vocab_size ..., then `<|image|>` at base_vocab_size + num_special."""
    return build_bpe(base_vocab_size, seed, (*special_tokens(num_special), IMAGE_TOKEN))


def save_tokenizer(tok: Tokenizer, out_dir: str, model_max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", model_max_length=model_max_length, chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    ).save_pretrained(out_dir)
