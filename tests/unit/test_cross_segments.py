"""The row ranges a decoded token reads in the CUDA-graph cross decode kernel (`token_segments`)
are exactly the rows transformers' cross-attention mask gives it (`visibility`, checked against
transformers token for token in test_mllama_engine): random images, spans and token positions,
prompt and generated tokens, images whose valid rows stop short of their padding tiles."""

from __future__ import annotations

import random

import torch

from epd.engine.attention.cross import token_segments, visibility


def _case(rng: random.Random) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    n = rng.randint(1, 4)
    cross_rows = []
    for _ in range(n):
        rows = rng.randint(1, 20)
        cross_rows.append((rows, rng.randint(1, rows)))
    prompt_len = rng.randint(n, 30)
    firsts = sorted(rng.sample(range(prompt_len), n))
    spans = [(f, -1 if i == n - 1 or rng.random() < 0.3 else rng.randint(f + 1, prompt_len))
             for i, f in enumerate(firsts)]
    return cross_rows, spans, prompt_len


def test_segments_cover_exactly_the_rows_the_mask_shows():
    rng = random.Random(0)
    for _ in range(120):
        cross_rows, spans, prompt_len = _case(rng)
        for index in range(prompt_len + 3):
            visible, sees = visibility(cross_rows, spans, prompt_len, index, index + 1)
            segments, sees_image = token_segments(cross_rows, spans, prompt_len, index)
            rows = torch.zeros(visible.shape[1], dtype=torch.bool)
            for start, end in segments:
                assert not rows[start:end].any(), "segments do not overlap"
                rows[start:end] = True
            assert torch.equal(rows, visible[0]) and sees_image == bool(sees[0])
            joined = all(a[1] < b[0] for a, b in zip(segments[:-1], segments[1:], strict=True))
            assert joined, "adjacent ranges are joined"


def test_a_generated_token_reads_the_last_images_valid_rows():
    # two images: the first seen only by the prompt between them, the last to the end
    segments, sees = token_segments([(12, 9), (8, 8)], [(0, 5), (5, -1)], prompt_len=10, index=11)
    assert segments == [(12, 20)] and sees
    # consecutive images at the end: both, the first's padding rows left out
    segments, _ = token_segments([(12, 9), (8, 8)], [(3, -1), (4, -1)], prompt_len=10, index=10)
    assert segments == [(0, 9), (12, 20)]
