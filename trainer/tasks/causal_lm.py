"""causal_lm: supervised fine-tuning of a GPT-style model on prompt/response pairs or chats.

Rows are rendered with the tokenizer's chat template (or plainly: prompt + response + eos) and only
the response tokens (with the end-of-turn marker) carry labels. Metrics: token-level loss,
perplexity and next-token accuracy, summed over every rank's shard; generated answers to the
prompts (eval.generate) for the loop to show and score. Never imports ray.
"""
from __future__ import annotations

import math

from trainer.config import ConfigError, DataConfig, RunConfig
from trainer.masking import IGNORE, chat_text, mask_labels, plain_text
from trainer.tasks.common import DROP, ROW, Prepared, bad, encode_split, model_loss, require_rows

AUTO_MODEL = "AutoModelForCausalLM"
PROCESSOR = "tokenizer"
UNIT = "tokens"
PACKS = True  # data.packing applies: pack() below
METRICS = ("loss", "perplexity", "token_accuracy")  # the validation scalars evaluate() reports
GENERATES = True  # answers prompts: generate() below (eval.generate)
loss = model_loss  # the training objective (trainer/tasks/common.py)


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
            why = ("data.template is 'plain'" if d.template == "plain" else
                   "the tokenizer has no chat template (data.template: auto)")
            raise ConfigError(f"{why}, but the data has a '{d.messages_column}' chat column: chats need a tokenizer "
                              f"with a chat template (model.tokenizer, and data.template: auto or chat)")
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


def prepare(split, cfg: RunConfig, tokenizer, labels: list[str], scratch=None) -> Prepared:
    """input_ids / labels per row (int32; the collator adds the attention mask). Rows whose response
    truncation to data.max_length removes entirely are dropped and counted (so are bad rows with
    data.skip_bad_rows)."""
    import numpy as np

    d = cfg.data
    require_rows(split)
    kind, chat = record_kind(split, d), uses_chat(d, tokenizer)
    truncated = f"responses beyond data.max_length = {d.max_length}"

    def encode(batch: dict) -> dict:
        n = len(next(iter(batch.values())))
        texts, spans, drops = [], [], []
        for i in range(n):
            try:
                text, found = render({k: v[i] for k, v in batch.items()}, kind, d, tokenizer, chat)
                drop = ""
            except ConfigError:
                raise  # the settings, not this row (a ConfigError is a ValueError too)
            except ValueError as err:
                text, found, drop = "", [], bad(*err.args)
            texts.append(text)
            spans.append(found)
            drops.append(drop)
        enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=d.max_length,
                        return_offsets_mapping=True)
        token_labels = [mask_labels(ids, offsets, found)
                        for ids, offsets, found in zip(enc["input_ids"], enc["offset_mapping"], spans)]
        drops = [drop or ("" if any(t != IGNORE for t in lab) else truncated) for drop, lab in zip(drops, token_labels)]
        # int32 on disk (half of what Python ints become); the collator makes the attention mask.
        return {"input_ids": [np.asarray(ids, np.int32) for ids in enc["input_ids"]],
                "labels": [np.asarray(lab, np.int32) for lab in token_labels], DROP: drops}

    try:
        return encode_split(split, cfg, encode, INPUTS, scratch=scratch)
    except ConfigError as err:
        if truncated in str(err) and "no usable row" in str(err):
            raise ConfigError(f"{split.source}: every response in the {split.name} split was truncated away by "
                              f"data.max_length = {d.max_length}; raise it") from None
        raise


INPUTS = ("input_ids", "labels")
PACKED = ("input_ids", "labels", "position_ids")


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group examples (by position) into rows of at most `capacity` tokens, none split: best-fit
    decreasing, so rows come out nearly full. Each row lists its examples in data order."""
    import bisect

    spaces: list[tuple[int, int]] = []  # (free tokens, row) sorted: the tightest row that fits comes first
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = min(lengths[i], capacity)
        at = bisect.bisect_left(spaces, (n, -1))
        if at < len(spaces):
            free, row = spaces.pop(at)
        else:
            free, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if free - n > 0:
            bisect.insort(spaces, (free - n, row))
    return [sorted(r) for r in rows]


def pack(prepared: Prepared, cfg: RunConfig, scratch=None) -> Prepared:
    """The training split as packed rows of up to data.max_length tokens: each example whole, its
    position_ids restarting at 0 (transformers then keeps attention inside each example) and the
    label of its first token ignored (it would be predicted from the previous example). No
    attention_mask: a packed row has no padding of its own."""
    import datasets
    import numpy as np

    lengths = [len(ids) for batch in prepared.table.select_columns(["input_ids"]).iter(10_000)
               for ids in batch["input_ids"]]
    groups = pack_rows(lengths, cfg.data.max_length)
    source = prepared.table.select_columns(["input_ids", "labels"])

    def join(batch: dict) -> dict:
        out: dict = {k: [] for k in (*PACKED, ROW)}
        for members in batch["members"]:
            parts = source[members]
            out["input_ids"].append(np.concatenate(parts["input_ids"]).astype(np.int32))
            labels = [np.asarray(lab, np.int32) for lab in parts["labels"]]
            for lab in labels:
                lab[0] = IGNORE
            out["labels"].append(np.concatenate(labels))
            out["position_ids"].append(np.concatenate([np.arange(len(ids), dtype=np.int32) for ids in parts["input_ids"]]))
            out[ROW].append(members[0])
        return out

    files = {} if scratch is None else {"cache_file_name": str(scratch / "train-packed.arrow")}
    table = datasets.Dataset.from_dict({"members": groups}).map(
        join, batched=True, batch_size=256, remove_columns=["members"], keep_in_memory=scratch is None,
        load_from_cache_file=False, new_fingerprint="sft-packed", **files)
    return Prepared(table, PACKED, None, prepared.rows_read, prepared.dropped, packed=True)


def collator(tokenizer):
    """Pads a micro-batch. Packed rows (they carry position_ids) are padded with a run of positions
    of their own, so padding forms a separate sequence nothing attends to."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(examples: list[dict]) -> dict:
        if "position_ids" not in examples[0]:
            return padded(examples)
        width = max(len(e["input_ids"]) for e in examples)
        fill = [width - len(e["input_ids"]) for e in examples]
        return {"input_ids": torch.tensor([e["input_ids"] + [pad_id] * k for e, k in zip(examples, fill)]),
                "labels": torch.tensor([e["labels"] + [IGNORE] * k for e, k in zip(examples, fill)]),
                "position_ids": torch.tensor([e["position_ids"] + list(range(k)) for e, k in zip(examples, fill)])}

    return collate


def count(examples: list[dict]) -> int:
    return sum(len(e["input_ids"]) for e in examples)


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
    for chunk, batch, logits in shard.batches(prepared):
        loss_sum, tokens, correct = batch_sums(logits, batch["labels"])
        sums = [a + b for a, b in zip(sums, (loss_sum, tokens, correct, float(len(chunk))))]
    return metrics_from_sums(*shard.sum(sums)), []


def prompt_and_reference(input_ids, labels) -> tuple[list[int], list[int]]:
    """A prepared example's prompt (the tokens before the first labelled one) and its reference
    answer (the first run of labelled tokens: the first response, with its end-of-turn marker)."""
    labels = list(labels)
    first = next(i for i, t in enumerate(labels) if t != IGNORE)  # preparation drops rows without one
    end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE), len(labels))
    return list(input_ids[:first]), list(input_ids[first:end])


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, attention_mask) of prompts padded on the left, so every answer starts at the end."""
    width = max(len(p) for p in prompts)
    return ([[pad_id] * (width - len(p)) + p for p in prompts],
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts])


def generate(shard, prepared: Prepared, tokenizer, count: int, settings) -> list[dict]:
    """Answers to the first `count` prompts of a split with the model's current weights, each
    example once across ranks, in batches of left-padded prompts; every rank gets every row, by id:
    {"id", "prompt", "reference", "answer"} (text without special tokens). `settings`: the
    eval.generate section. Every rank must call this together (see Shard.chunks)."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def text(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    local = []
    for chunk in shard.chunks(count):
        pairs = [prompt_and_reference(e["input_ids"], e["labels"]) for e in prepared.examples(chunk or [0])]
        ids, mask = left_pad([prompt or [start] for prompt, _ in pairs], pad_id)
        out = shard.generate(torch.tensor(ids, device=shard.device), torch.tensor(mask, device=shard.device),
                             max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
        if not chunk:
            continue  # a stand-in: this rank's shard ran out
        answers = out[:, len(ids[0]):].tolist()
        for row, (prompt, reference), answer in zip(prepared.column(ROW, chunk), pairs, answers):
            local.append({"id": row, "prompt": text(prompt), "reference": text(reference), "answer": text(answer)})
    return sorted((r for part in shard.gather(local) for r in part), key=lambda r: r["id"])
