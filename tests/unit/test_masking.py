"""Loss masking: only response tokens carry labels."""
import pytest

from trainer.masking import IGNORE, chat_text, mask_labels, plain_text


def test_plain_text_span_covers_response_and_eos():
    text, spans = plain_text("Q: 2+2? ", "4", "</s>")
    assert text == "Q: 2+2? 4</s>" and spans == [(8, 13)]


def test_mask_labels_keeps_tokens_starting_inside_spans():
    ids = [10, 11, 12, 13, 14]
    offsets = [(0, 0), (0, 3), (3, 8), (8, 9), (9, 13)]  # a BOS-like special token first
    assert mask_labels(ids, offsets, [(8, 13)]) == [IGNORE, IGNORE, IGNORE, 13, 14]


def render(messages, add_generation_prompt):
    out = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
    return out + ("<assistant>" if add_generation_prompt else "")


def test_chat_spans_cover_every_assistant_turn_only():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    text, spans = chat_text(msgs, render)
    assert [text[s:e] for s, e in spans] == ["yo</>", "ok</>"]


def test_template_that_is_not_a_growing_prefix_is_refused():
    def reordering(messages, add_generation_prompt):
        return "".join(m["content"] for m in reversed(messages)) + ("?" if add_generation_prompt else "")

    with pytest.raises(ValueError, match="growing prefix"):
        chat_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], reordering)


def test_real_tokenizer_labels_only_the_response(tmp_path):
    from transformers import AutoTokenizer

    from tests.helpers import make_tokenizer

    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))
    msgs = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "Answer: 4."}]
    text, spans = chat_text(msgs, lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = mask_labels(enc["input_ids"], enc["offset_mapping"], spans)
    learned = tok.decode([t for t in labels if t != IGNORE])
    assert learned == "Answer: 4.<|im_end|>\n"
