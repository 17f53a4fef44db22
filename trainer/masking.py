"""Loss masking for SFT: which tokens carry a label, as pure functions over characters and offsets.

Text is rendered first (chat template or plain), with the character spans of the responses; the
tokenizer's offset mapping then says which tokens fall inside a response. Only those keep a label;
every other position gets IGNORE (-100, what transformers' loss skips). Imports only the stdlib.
"""
from __future__ import annotations

from typing import Callable, Sequence

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


def plain_text(prompt: str, response: str, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """prompt + response + eos; the response and the eos are learned."""
    text = prompt + response + eos
    return text, [(len(prompt), len(text))]


def chat_text(messages: Sequence[dict], render: Callable[..., str]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; every assistant turn (with its end-of-turn marker) is a response span.

    `render(messages, add_generation_prompt)` is the tokenizer's chat template as text. A turn's span
    runs from the end of the prompt that asks for it to the end of the conversation up to that turn.
    """
    full = render(list(messages), False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        asked = render(list(messages[:i]), True)
        answered = render(list(messages[:i + 1]), False)
        if not (full.startswith(answered) and answered.startswith(asked)):
            raise ValueError("the chat template does not render a conversation as a growing prefix, "
                             "so response tokens cannot be located; use data.template: plain")
        spans.append((len(asked), len(answered)))
    return full, spans
