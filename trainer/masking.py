"""Loss masking for SFT: which tokens carry a label, as pure functions over characters and offsets.

Text is rendered first (trainer/chat.py: chat template or plain), with the character spans that
are learned; the tokenizer's offset mapping then says which tokens fall inside one. Only those keep a label;
every other position gets IGNORE (-100, what transformers' loss skips). Imports only the stdlib.
"""
from __future__ import annotations

from typing import Sequence

IGNORE = -100


def mask_labels(input_ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                spans: Sequence[tuple[int, int]]) -> list[int]:
    """Labels equal to input_ids where the token starts inside a response span, else IGNORE.

    Special tokens carry the offset (0, 0) and are never labelled, except when they lie inside a
    span as real text (an end-of-turn marker written by a template is text with a proper offset).
    """
    if len(spans) == 1:  # a prompt/response pair: one comparison per token (this runs over every row)
        (lo, hi), = spans
        return [tok if end > start and lo <= start < hi else IGNORE for tok, (start, end) in zip(input_ids, offsets)]
    return [tok if end > start and any(s <= start < e for s, e in spans) else IGNORE
            for tok, (start, end) in zip(input_ids, offsets)]
