"""The tokenizer of random Llama 4 checkpoints: byte-level BPE with Llama 4's 2048 special tokens in
Llama 4's numbering after the base vocabulary (at full size `<|begin_of_text|>` = 200000, `<|eot|>` =
200008, `<|image_start|>` = 200080, `<|image|>` = 200090, `<|patch|>` = 200092, vocab 202048). An
image is `<|image_start|>`, for several tiles rows of `<|patch|>` runs separated by
`<|tile_x_separator|>` and ended by `<|tile_y_separator|>`, then `<|image|>` and the global view's
`<|patch|>` run, then `<|image_end|>`; the `<|patch|>` tokens are the ones image embeddings replace.
The chat template is our own Jinja rendering of the Llama 4 header format (content untrimmed,
one `<|image|>` per image part; BOS from the template).
"""

from __future__ import annotations

from tokenizers import Tokenizer

from epd.models.tiny_tokenizer import build_bpe

NUM_SPECIAL = 2048
# offsets from the base vocabulary of the named special tokens; the gaps are reserved tokens
_NAMED = {
    0: "<|begin_of_text|>", 1: "<|end_of_text|>", 2: "<|fim_prefix|>", 3: "<|fim_middle|>", 4: "<|fim_suffix|>",
    5: "<|header_start|>", 6: "<|header_end|>", 7: "<|eom|>", 8: "<|eot|>", 9: "<|step|>",
    16: "<|python_start|>", 17: "<|python_end|>", 18: "<|finetune_right_pad|>",
    80: "<|image_start|>", 81: "<|image_end|>", 84: "<|tile_x_separator|>", 85: "<|tile_y_separator|>",
    90: "<|image|>", 92: "<|patch|>",
    1142: "<|reasoning_thinking_start|>", 1143: "<|reasoning_thinking_end|>",
}
OFFSETS = {name: offset for offset, name in _NAMED.items()}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ '<|image|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\n\n' }}{% endif %}"
)


def special_tokens() -> tuple[str, ...]:
    """The 2048 special tokens in id order: the named ones at their offsets, reserved ones between."""
    return tuple(_NAMED.get(i, f"<|reserved_special_token_{i}|>") for i in range(NUM_SPECIAL))


def build_tokenizer(base_vocab_size: int, seed: int = 0) -> Tokenizer:
    return build_bpe(base_vocab_size, seed, special_tokens())


def save_tokenizer(tok: Tokenizer, out_dir: str, model_max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot|>", pad_token="<|finetune_right_pad|>",
        model_max_length=model_max_length, chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image|>", "patch_token": "<|patch|>"},
    ).save_pretrained(out_dir)
