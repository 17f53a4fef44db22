"""preference: preference tuning (DPO, IPO, SimPO, ORPO) of a causal LM on chosen/rejected pairs.

Rows (columns `chosen` and `rejected`, and the prompt):
- TRL standard: `prompt`, `chosen`, `rejected` as strings;
- TRL conversational: `prompt` a list of {role, content} turns, `chosen` / `rejected` a list holding
  one assistant turn;
- LLaMA-Factory ShareGPT: `conversations` the prompt's {from, value} turns (a system turn may open
  them, or a `system` column), `chosen` / `rejected` ONE {from, value} turn each (or a list of one).
The prompt and each completion are rendered as causal_lm renders a conversation (trainer/chat.py:
the chat template, or prompt + response + eos); the prompt is tokenized once and shared by both
completions; only completion tokens count. Truncation to data.max_length keeps every completion
whole and the prompt's end; a row whose longer completion leaves no prompt token is dropped (counted).

Training: chosen and rejected go through the model in ONE concatenated forward per micro-batch
(chosen rows first, right-padded, padding masked); the per-example completion log-probabilities
feed preference.loss (trainer/preference_loss.py), the reference's come as batch columns
(trainer/reference.py) or, with preference.reference: adapters_off, from the LoRA model with its
adapters disabled. Metrics: TRL's (loss, rewards/*, logps/*), exact across ranks; generation of the
test prompts as causal_lm. Never imports ray.
"""
from __future__ import annotations

from typing import Any, Optional

from trainer.config import ConfigError, DataConfig, RunConfig
from trainer.conversation import BadRow, Conversation, Turn, cell_text, chat_turns, reading as turn_reading
from trainer.data import Prepared
from trainer.masking import IGNORE
from trainer.tasks.common import DROP, ROW, NoUsableRows, bad, encode_split, require_rows

CHOSEN, REJECTED = "chosen", "rejected"  # the completion columns of every format
INPUTS = ("prompt_ids", "chosen_ids", "rejected_ids")
REF_CHOSEN, REF_REJECTED = "ref_chosen", "ref_rejected"  # batch columns: the reference's log-probabilities
REFERENCE = "reference"  # prepared column outside the training split: the chosen answer's text


def _reading(split, d: DataConfig):
    """(format, turn Reading) of a preference file: sharegpt when it has the conversations column,
    else prompt/chosen/rejected (strings or turn lists, told apart per row)."""
    present = set(split.columns)
    missing = [c for c in (CHOSEN, REJECTED) if c not in present]
    sharegpt = turn_reading(d, "sharegpt", "auto: a 'conversations' column")
    prompt = d.prompt_column or "prompt"
    if missing:
        raise ConfigError(f"{split.source}: the {split.name} split has no column {', '.join(repr(c) for c in missing)}; "
                          f"preference data needs '{CHOSEN}' and '{REJECTED}' beside the prompt ('{prompt}', or "
                          f"'{sharegpt.messages}' for ShareGPT rows); found columns: {', '.join(split.columns) or 'none'}")
    if sharegpt.messages in present:
        return "sharegpt", sharegpt
    if prompt not in present:
        raise ConfigError(f"{split.source}: the {split.name} split has no prompt column '{prompt}' (data.prompt_column) "
                          f"nor '{sharegpt.messages}' (ShareGPT); found columns: {', '.join(split.columns)}")
    return "trl", turn_reading(d, "messages", f"'{prompt}', '{CHOSEN}', '{REJECTED}'")


def check_columns(split, d: DataConfig) -> str:
    fmt, r = _reading(split, d)
    if fmt == "sharegpt":
        return f"{split.name}: preference pairs, ShareGPT ('{r.messages}' {{{r.role_key}, {r.content_key}}} turns + one '{CHOSEN}' / '{REJECTED}' turn)"
    return f"{split.name}: preference pairs, TRL ('{d.prompt_column or 'prompt'}', '{CHOSEN}', '{REJECTED}': text or turns)"


def needs_reference(cfg: RunConfig) -> bool:
    """The objective reads the starting model's log-probabilities from the pass before training."""
    return cfg.preference.precomputed


def label_names(cfg: RunConfig, train) -> list[str]:
    return []


def _completion(value: Any, column: str, r) -> str:
    """A completion cell: text, one {role, content} turn, or a list holding one assistant turn."""
    if value is None:
        raise BadRow(column, "is missing")
    if isinstance(value, str):
        return cell_text(value, column)
    turns = value if isinstance(value, list) else [value]
    if len(turns) != 1 or not isinstance(turns[0], dict):
        raise BadRow(column, f"must be text or ONE assistant turn {{{r.role_key}, {r.content_key}}}, got {value!r:.80}")
    role = r.roles.get(turns[0].get(r.role_key)) if isinstance(turns[0].get(r.role_key), str) else None
    if role != "assistant":
        raise BadRow(column, f"must be an assistant turn, got the role {turns[0].get(r.role_key)!r} ({r.role_key!r})")
    return cell_text(turns[0].get(r.content_key), column, f"the turn's {r.content_key!r}")


def read_pair(record: dict, fmt: str, r, d: DataConfig) -> tuple[Conversation, str, str]:
    """(the prompt as a conversation without its answer, the chosen text, the rejected text); a
    BadRow names what is wrong with the row."""
    if fmt == "sharegpt":
        turns = chat_turns(record.get(r.messages), r)
    else:
        column = d.prompt_column or "prompt"
        value = record.get(column)
        if isinstance(value, list):
            turns = chat_turns(value, turn_reading_for(r, column))
        else:
            turns = [Turn("user", cell_text(value, column))]
    if not turns or turns[-1].role not in ("user", "tool"):
        raise BadRow(r.messages if fmt == "sharegpt" else (d.prompt_column or "prompt"),
                     "the prompt must end with a user (or tool) turn for the completions to answer")
    system = record.get(r.system)
    if not any(t.role == "system" for t in turns):
        default = system if isinstance(system, str) and system.strip() else d.system_prompt
        if default:
            turns.insert(0, Turn("system", default))
    chosen, rejected = _completion(record.get(CHOSEN), CHOSEN, r), _completion(record.get(REJECTED), REJECTED, r)
    if chosen.strip() == rejected.strip():
        raise BadRow(REJECTED, "is the same as 'chosen': the pair prefers nothing")
    return Conversation(tuple(turns)), chosen, rejected


def turn_reading_for(r, column: str):
    """The turn Reading `r` for a prompt held in `column` (its errors name that column)."""
    from dataclasses import replace

    return replace(r, messages=column)


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int) -> Optional[list[int]]:
    """The prompt's last tokens that fit beside the longer completion within max_length (both
    completions stay whole); None when not one prompt token fits (the row is dropped)."""
    room = max_length - max(len(chosen), len(rejected))
    if room < 1:
        return None
    return prompt[-room:] if len(prompt) > room else prompt


def prepare(split, cfg: RunConfig, tokenizer, labels: list[str], scratch=None) -> Prepared:
    """prompt_ids / chosen_ids / rejected_ids per row (int32); outside the training split also the
    chosen text (REFERENCE) for generation. Bad rows raise (or are skipped with data.skip_bad_rows)."""
    import numpy as np

    from trainer.chat import render, template

    d = cfg.data
    require_rows(split)
    fmt, r = _reading(split, d)
    tpl = template(d, tokenizer)
    too_long = f"completions longer than data.max_length - 1 = {d.max_length - 1} tokens"
    answers = split.name != "train"

    def encode(batch: dict) -> dict:
        n = len(next(iter(batch.values())))
        prompts, chosens, rejecteds, references, drops = [], [], [], [], []
        for i in range(n):
            try:
                conv, chosen, rejected = read_pair({k: v[i] for k, v in batch.items()}, fmt, r, d)
                rc = render(Conversation(conv.turns + (Turn("assistant", chosen),)), tpl, tokenizer, d)
                rr = render(Conversation(conv.turns + (Turn("assistant", rejected),)), tpl, tokenizer, d)
                texts = (rc.text[:rc.answer_at], rc.text[rc.answer_at:], rr.text[rr.answer_at:], rc.reference, "")
            except BadRow as err:
                texts = ("", "", "", "", bad(err.column or CHOSEN, err.problem))
            for out, text in zip((prompts, chosens, rejecteds, references, drops), texts):
                out.append(text)
        enc = {name: tokenizer(texts, add_special_tokens=False)["input_ids"]
               for name, texts in (("prompt", prompts), ("chosen", chosens), ("rejected", rejecteds))}
        kept = []
        for k in range(n):
            cut = truncate(enc["prompt"][k], enc["chosen"][k], enc["rejected"][k], d.max_length)
            if not drops[k] and (not enc["chosen"][k] or not enc["rejected"][k]):
                drops[k] = bad(CHOSEN if not enc["chosen"][k] else REJECTED, "the completion has no tokens")
            elif not drops[k] and cut is None:
                drops[k] = too_long
            kept.append(cut or [])
        out = {"prompt_ids": [np.asarray(p, np.int32) for p in kept],
               "chosen_ids": [np.asarray(c, np.int32) for c in enc["chosen"]],
               "rejected_ids": [np.asarray(c, np.int32) for c in enc["rejected"]], DROP: drops}
        if answers:
            out[REFERENCE] = references
        return out

    try:
        return encode_split(split, cfg, encode, INPUTS, scratch=scratch)
    except NoUsableRows as err:
        if too_long in err.dropped:
            raise ConfigError(f"{split.source}: every pair in the {split.name} split has a completion that fills "
                              f"data.max_length = {d.max_length}; raise it") from None
        raise


def collator(tokenizer):
    """One concatenated batch per micro-batch: the chosen rows (prompt + chosen) then the rejected
    ones (prompt + rejected), right-padded; labels only on completion tokens. The reference's
    log-probabilities, where the examples carry them, come along as per-example float columns."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(examples: list[dict]) -> dict:
        rows = [(e["prompt_ids"], e[f"{side}_ids"]) for side in (CHOSEN, REJECTED) for e in examples]
        width = max(len(p) + len(c) for p, c in rows)
        ids, mask, labels = [], [], []
        for p, c in rows:
            fill = width - len(p) - len(c)
            ids.append(list(p) + list(c) + [pad_id] * fill)
            mask.append([1] * (len(p) + len(c)) + [0] * fill)
            labels.append([IGNORE] * len(p) + list(c) + [IGNORE] * fill)
        batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}
        for column in (REF_CHOSEN, REF_REJECTED):
            if column in examples[0]:
                batch[column] = torch.tensor([float(e[column]) for e in examples], dtype=torch.float64)
        return batch

    return collate


def count(examples: list[dict]) -> int:
    return sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)


def completion_logps(logits, labels) -> tuple[Any, Any]:
    """(sum of log-probabilities, token count) of each row's labelled tokens; position t predicts
    token t + 1. In float32 at least, whatever the model's precision."""
    import torch

    logits, target = logits[:, :-1], labels[:, 1:]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    mask = target != IGNORE
    picked = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def _forward(model, batch: dict):
    """Per-row completion log-probabilities of a concatenated batch through `model` (the engine, or
    the module itself for the reference pass without gradients)."""
    sums, lengths = completion_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           use_cache=False).logits, batch["labels"])
    return sums, lengths


def pairs(model, batch: dict, settings, reference_model=None):
    """The micro-batch's Pairs: one forward of the policy over chosen + rejected; the reference from
    the batch columns, or (adapters_off) one forward of the LoRA model with its adapters disabled."""
    import torch

    from trainer.preference_loss import Pairs

    sums, lengths = _forward(model, batch)
    n = sums.shape[0] // 2
    ref_chosen = ref_rejected = None
    if settings.needs_reference:
        if settings.precomputed:
            ref_chosen, ref_rejected = batch[REF_CHOSEN].to(sums.dtype), batch[REF_REJECTED].to(sums.dtype)
        else:
            with torch.no_grad(), reference_model.disable_adapter():
                ref, _ = _forward(reference_model, batch)
            ref_chosen, ref_rejected = ref[:n], ref[n:]
    return Pairs(sums[:n], sums[n:], lengths[:n], lengths[n:], ref_chosen, ref_rejected)


def loss(model, batch: dict, impl, cfg: RunConfig):
    """The preference objective of one micro-batch (mean over its pairs)."""
    from trainer.preference_loss import objective

    losses, _, _ = objective(pairs(model, batch, cfg.preference, model.module), cfg.preference)
    return losses.mean()


def evaluate(shard, prepared: Prepared, labels: list[str]) -> tuple[dict, list[dict]]:
    """TRL's metrics over the split: each pair once across ranks, means of per-example terms."""
    from trainer.preference_loss import metric_sums, metrics_from_sums, objective

    settings = shard.config.preference

    def terms(batch: dict) -> list[float]:
        p = pairs(shard.model, batch, settings, shard.model.module)
        return metric_sums(*objective(p, settings), p)

    sums = [0.0] * 8
    for _, _, out in shard.batches(prepared, terms):
        sums = [a + b for a, b in zip(sums, out)]
    return metrics_from_sums(shard.sum(sums)), []


def reference_logps(shard, prepared: Prepared) -> list[tuple[float, float]]:
    """The (chosen, rejected) completion log-probabilities of every example of a split under the
    engine's current weights (the starting model: trainer/reference.py), by position, on every rank."""
    local = []
    for chunk, _, (sums, _) in shard.batches(prepared, lambda batch: _forward(shard.model, batch)):
        n = len(chunk)
        local += [(at, float(c), float(r)) for at, c, r in zip(chunk, sums[:n].tolist(), sums[n:].tolist())]
    out = [(0.0, 0.0)] * len(prepared)
    for part in shard.gather(local):
        for at, c, r in part:
            out[at] = (c, r)
    return out


def generate(shard, prepared: Prepared, tokenizer, count: int, settings) -> list[dict]:
    """Answers to the first `count` prompts of a split (as causal_lm's generate), by id:
    {"id", "prompt", "reference" (the chosen answer), "answer"}. Every rank calls it together."""
    import torch

    from trainer.tasks.causal_lm import left_pad

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def text(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    local = []
    for chunk in shard.chunks(count):
        positions = chunk or [0]
        prompts = [list(e["prompt_ids"]) for e in prepared.examples(positions)]
        ids, mask = left_pad(prompts, pad_id)
        out = shard.generate(torch.tensor(ids, device=shard.device), torch.tensor(mask, device=shard.device),
                             max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
        if not chunk:
            continue  # a stand-in: this rank's shard ran out
        for row, prompt, reference, answer in zip(prepared.column(ROW, chunk), prompts,
                                                  prepared.column(REFERENCE, chunk), out[:, len(ids[0]):].tolist()):
            local.append({"id": row, "prompt": text(prompt), "reference": reference, "answer": text(answer)})
    return sorted((r for part in shard.gather(local) for r in part), key=lambda r: r["id"])
