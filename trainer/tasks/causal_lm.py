"""causal_lm: supervised fine-tuning of a GPT-style model on instruction data.

Rows in any of the formats of trainer/conversation.py (prompt/response pairs, Alpaca, OpenAI
messages, ShareGPT) are read into conversations and rendered with the chat template
(trainer/chat.py; or plainly: prompt + response + eos); the assistant turns (data.train_on, with
their end-of-turn marker) carry labels. Metrics: token-level loss, perplexity and next-token
accuracy, summed over every rank's shard; generated answers to the last assistant turn of each
conversation (eval.generate) for the loop to show and score. The loss and the evaluation follow
train.loss_impl: the model's full logits, or its last hidden states and the LM head a chunk at a
time (trainer/chunked_loss.py). Never imports ray.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

from trainer.config import ConfigError, DataConfig, RunConfig
from trainer.masking import IGNORE, mask_labels
from trainer.data import Prepared
from trainer.tasks.common import DROP, ROW, NoUsableRows, bad, encode_split, model_loss, require_rows

def causal_lm(engine):
    """The transformers causal LM inside the engine (under LoRA: the peft wrapper's base model, whose
    layers carry the adapters)."""
    lm = engine.module
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


@contextmanager
def hidden_state_objective(lm, impl: str, chunks: int):
    """Inside: the model's forward returns the train.loss_impl loss from its last hidden states
    instead of the full logits. The forward is swapped on the instance (not bypassed) because
    DeepSpeed's engine forward must wrap the whole objective: it hooks the backward prologue of its
    ZeRO optimizer on the forward's outputs, and under ZeRO-3 the top module's hooks run around it."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from trainer.chunked_loss import chunked_loss, shifted_targets

    def forward(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                shift_labels=None, num_items_in_batch=None, **_):
        # The rest (peft's output_* flags, return_dict) changes nothing of the loss. shift_labels and
        # num_items_in_batch: a sequence-parallel shard's (trainer/sequence_parallel.py).
        hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state
        head = lm.get_output_embeddings()
        if impl == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
            loss = fused(head.weight, hidden.reshape(-1, hidden.size(-1)), shifted_targets(labels), head.bias)
        else:
            loss = chunked_loss(hidden, labels, head, chunks, shift_labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss)

    before = lm.__dict__.get("forward")  # a forward set on the instance already (a hook's wrapper)
    lm.forward = forward
    try:
        yield
    finally:
        if before is None:
            del lm.forward  # the class's forward again
        else:
            lm.forward = before


def loss(model, batch: dict, impl, cfg=None):
    """The training objective: the model's own loss (standard), or the same mean token cross-entropy
    without the full logits (chunked, liger; trainer/chunked_loss.py). `impl`: a LossImpl."""
    if impl.name == "standard":
        return model_loss(model, batch)
    with hidden_state_objective(causal_lm(model), impl.name, impl.chunks):
        return model(**batch).loss


def reading(split, d: DataConfig):
    """How this split's rows are read (trainer/conversation.py): data.format, or detected from the
    columns and first rows; a ConfigError names what was found and what each format expects."""
    from trainer.conversation import SAMPLE, detect

    return detect(split.columns, split.table.select(range(min(SAMPLE, len(split)))).to_list(), d, split.source)


TRAIN_ON = {"assistant": "every assistant turn", "last": "the last assistant turn", "all": "the whole conversation"}


def check_columns(split, d: DataConfig) -> str:
    eos = "with" if d.train_on_eos else "without"
    return f"{split.name}: {reading(split, d).describe()}; labels on {TRAIN_ON[d.train_on]} ({eos} end-of-turn marker)"


def label_names(cfg: RunConfig, train) -> list[str]:
    return []


def prepare(split, cfg: RunConfig, tokenizer, labels: list[str], scratch=None) -> Prepared:
    """input_ids / labels per row (int32; the collator adds the attention mask); outside the
    training split also where the last answer starts (ANSWER_AT, in tokens) and its text
    (REFERENCE), what generation asks and compares. Rows whose labelled tokens truncation to
    data.max_length removes entirely are dropped and counted (so are bad rows with data.skip_bad_rows)."""
    import bisect

    import numpy as np

    from trainer.chat import render, template
    from trainer.conversation import BadRow, read

    d = cfg.data
    require_rows(split)
    r, tpl = reading(split, d), template(d, tokenizer)
    column = r.messages or r.response
    truncated = f"responses beyond data.max_length = {d.max_length}"
    answers = split.name != "train"

    def encode(batch: dict) -> dict:
        n = len(next(iter(batch.values())))
        texts, spans, cuts, references, drops = [], [], [], [], []
        for i in range(n):
            try:
                out = render(read({k: v[i] for k, v in batch.items()}, r), tpl, tokenizer, d)
                text, found, cut, reference, drop = out.text, out.spans, out.answer_at, out.reference, ""
            except BadRow as err:  # this row, not the settings (those raise a ConfigError)
                text, found, cut, reference, drop = "", (), 0, "", bad(err.column or column, err.problem)
            texts.append(text)
            spans.append(found)
            cuts.append(cut)
            references.append(reference)
            drops.append(drop)
        enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=d.max_length,
                        return_offsets_mapping=True)
        token_labels = [mask_labels(ids, offsets, found)
                        for ids, offsets, found in zip(enc["input_ids"], enc["offset_mapping"], spans)]
        drops = [drop or ("" if any(t != IGNORE for t in lab) else truncated) for drop, lab in zip(drops, token_labels)]
        # int32 on disk (half of what Python ints become); the collator makes the attention mask.
        out = {"input_ids": [np.asarray(ids, np.int32) for ids in enc["input_ids"]],
               "labels": [np.asarray(lab, np.int32) for lab in token_labels], DROP: drops}
        if answers:
            out[ANSWER_AT] = [bisect.bisect_left([a for a, _ in offsets], cut)
                              for offsets, cut in zip(enc["offset_mapping"], cuts)]
            out[REFERENCE] = references
        return out

    try:
        return encode_split(split, cfg, encode, INPUTS, scratch=scratch)
    except NoUsableRows as err:
        if truncated in err.dropped:  # the reason encode() gave those rows
            raise ConfigError(f"{split.source}: every response in the {split.name} split was truncated away by "
                              f"data.max_length = {d.max_length}; raise it") from None
        raise


ANSWER_AT, REFERENCE = "answer_at", "reference"  # prepared columns outside the training split (generation)
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


def hidden_sums(engine, chunks: int, batch: dict) -> tuple[float, float, float]:
    """batch_sums from the last hidden states, the LM head applied to `chunks` slices of the labelled
    positions (trainer/chunked_loss.py): evaluation without the full logits either."""
    from trainer.chunked_loss import chunked_sums

    lm = causal_lm(engine)
    hidden = lm.base_model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).last_hidden_state
    return chunked_sums(hidden, batch["labels"], lm.get_output_embeddings(), chunks)


def evaluate(shard, prepared: Prepared, labels: list[str]) -> tuple[dict, list[dict]]:
    """Loss, perplexity and token accuracy over the split; with train.loss_impl chunked or liger the
    logits a chunk at a time (hidden_sums), else from the model's full logits (batch_sums)."""
    from functools import partial

    # liger evaluates as chunked does: without gradients there is nothing to fuse
    chunked = shard.loss_impl.name != "standard"
    sums = [0.0, 0.0, 0.0, 0.0]
    for chunk, batch, out in shard.batches(prepared, partial(hidden_sums, shard.model, shard.loss_impl.chunks)
                                           if chunked else None):
        loss_sum, tokens, correct = out if chunked else batch_sums(out, batch["labels"])
        sums = [a + b for a, b in zip(sums, (loss_sum, tokens, correct, float(len(chunk))))]
    return metrics_from_sums(*shard.sum(sums)), []


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
        positions = chunk or [0]
        prompts = [e["input_ids"][:at] for e, at in zip(prepared.examples(positions), prepared.column(ANSWER_AT, positions))]
        ids, mask = left_pad([prompt or [start] for prompt in prompts], pad_id)
        out = shard.generate(torch.tensor(ids, device=shard.device), torch.tensor(mask, device=shard.device),
                             max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
        if not chunk:
            continue  # a stand-in: this rank's shard ran out
        answers = out[:, len(ids[0]):].tolist()
        for row, prompt, reference, answer in zip(prepared.column(ROW, chunk), prompts,
                                                  prepared.column(REFERENCE, chunk), answers):
            local.append({"id": row, "prompt": text(prompt), "reference": reference, "answer": text(answer)})
    return sorted((r for part in shard.gather(local) for r in part), key=lambda r: r["id"])
