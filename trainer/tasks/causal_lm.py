"""causal_lm: supervised fine-tuning of a GPT-style model on prompt/response pairs or chats.

Rows are rendered with the tokenizer's chat template (or plainly: prompt + response + eos) and only
the response tokens (with the end-of-turn marker) carry labels. Metrics: token-level loss,
perplexity and next-token accuracy, summed over every rank's shard. Never imports ray.
"""
from __future__ import annotations

import math

from trainer.config import ConfigError, DataConfig, RunConfig
from trainer.masking import IGNORE, chat_text, mask_labels, plain_text
from trainer.tasks.common import BadRows, Prepared, require_rows

AUTO_MODEL = "AutoModelForCausalLM"
PROCESSOR = "tokenizer"
UNIT = "tokens"


def record_kind(split, d: DataConfig) -> str:
    """'chat' when the messages column is present, 'pair' for prompt/response; else a clear error."""
    columns = split.columns
    if d.messages_column in columns:
        return "chat"
    if d.prompt_column in columns and d.response_column in columns:
        return "pair"
    raise ConfigError(f"{split.source}: expected a '{d.messages_column}' column, or '{d.prompt_column}' and "
                      f"'{d.response_column}' columns (data.messages_column / data.prompt_column / "
                      f"data.response_column); found columns: {', '.join(columns) or 'none'}")


def check_columns(split, d: DataConfig) -> None:
    record_kind(split, d)


def label_names(cfg: RunConfig, train) -> list[str]:
    return []


def uses_chat(d: DataConfig, tokenizer) -> bool:
    if d.template == "chat" and tokenizer.chat_template is None:
        raise ConfigError("data.template is 'chat' but the tokenizer has no chat template; use data.template: "
                          "plain (prompt + response + eos) or auto, or a tokenizer with a template (model.tokenizer)")
    return d.template == "chat" or (d.template == "auto" and tokenizer.chat_template is not None)


def render(record: dict, kind: str, d: DataConfig, tokenizer, chat: bool) -> tuple[str, list]:
    """The example's text and its response spans; a ValueError says what is wrong with the row as
    (column, problem)."""
    if kind == "chat":
        messages = record[d.messages_column]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError(d.messages_column, "must be a non-empty list of {role, content} messages")
        if not any(m.get("role") == "assistant" for m in messages):
            raise ValueError(d.messages_column, "the conversation has no assistant message to learn")
        if not chat:
            raise ConfigError(f"data.template is 'plain' but the data has a '{d.messages_column}' chat column; "
                              f"chats need a tokenizer with a chat template (data.template: auto or chat)")
    else:
        prompt, response = record[d.prompt_column], record[d.response_column]
        for col, value in ((d.prompt_column, prompt), (d.response_column, response)):
            if not isinstance(value, str):
                raise ValueError(col, f"must be text, got {value!r}")
        if not response.strip():
            raise ValueError(d.response_column, "is empty")
        if not chat:
            return plain_text(prompt, response, tokenizer.eos_token or "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

    def apply(msgs, add_generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    try:
        return chat_text(messages, apply)
    except ValueError as err:
        raise ConfigError(f"data.template: {err}") from None


def prepare(split, cfg: RunConfig, tokenizer, labels: list[str]) -> Prepared:
    """input_ids / attention_mask / labels per row. Rows whose response truncation to data.max_length
    removes entirely are dropped and counted (so are bad rows with data.skip_bad_rows)."""
    d = cfg.data
    require_rows(split)
    kind, chat = record_kind(split, d), uses_chat(d, tokenizer)
    rows = BadRows(split, d.skip_bad_rows)
    out = Prepared([], why_dropped=f"a response beyond data.max_length = {d.max_length}, or a bad row with "
                                   f"data.skip_bad_rows")
    truncated = 0
    for i, record in enumerate(split.records):
        try:
            text, spans = render(record, kind, d, tokenizer, chat)
        except ValueError as err:
            rows.bad(i, *err.args)
            continue
        enc = tokenizer(text, add_special_tokens=False, truncation=True, max_length=d.max_length,
                        return_offsets_mapping=True)
        token_labels = mask_labels(enc["input_ids"], enc["offset_mapping"], spans)
        if all(label == IGNORE for label in token_labels):
            truncated += 1
            continue
        out.add({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": token_labels},
                split.row(i))
    if not out.examples:
        raise ConfigError(f"{split.source}: every response in the {split.name} split was truncated away by "
                          f"data.max_length = {d.max_length}; raise it")
    out.dropped = truncated + rows.skipped
    return out


def collator(tokenizer):
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")


def count(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


def metrics_from_sums(loss_sum: float, tokens: float, correct: float, examples: float) -> dict[str, float]:
    """Token-level mean loss, perplexity and next-token accuracy from summed statistics."""
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(tokens, 1.0),
            "tokens": tokens, "examples": examples}


def batch_sums(logits, labels) -> tuple[float, float, float]:
    """(loss_sum, tokens, correct) of a batch; position t predicts token t + 1."""
    import torch.nn.functional as F

    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    correct = ((logits.argmax(-1) == target) & mask).sum()
    return float(loss_sum), float(mask.sum()), float(correct)


def evaluate(shard, prepared: Prepared, labels: list[str]) -> tuple[dict, list[dict]]:
    sums = [0.0, 0.0, 0.0, 0.0]
    for chunk, batch, logits in shard.batches(prepared.examples):
        loss_sum, tokens, correct = batch_sums(logits, batch["labels"])
        sums = [a + b for a, b in zip(sums, (loss_sum, tokens, correct, float(len(chunk))))]
    return metrics_from_sums(*shard.sum(sums)), []
