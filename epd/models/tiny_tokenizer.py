"""Byte-level BPE tokenizers for random test checkpoints (every family's `write_tiny` uses one).

The merges are trained on a synthetic corpus in milliseconds; the vocabulary is then padded with
filler tokens so the special tokens after it land on the ids the preset asks for (at full size a
family's own numbering). `leading` special tokens (Llama's `<unk>`, `<s>`, `</s>`) take ids 0, 1, ...
"""

from __future__ import annotations

import json
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


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


def build_bpe(base_vocab_size: int, seed: int, special: tuple[str, ...], leading: tuple[str, ...] = ()) -> Tokenizer:
    """Byte-level BPE whose `leading` tokens get ids 0, 1, ... and `special` tokens ids
    base_vocab_size, base_vocab_size + 1, ..."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(base_vocab_size, 2000),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=list(leading),
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
    tok.add_special_tokens(list(special))
    return tok
