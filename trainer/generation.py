"""Generated answers as data: the TensorBoard table, the jsonl files and the text metrics.

A task that generates (trainer/tasks/causal_lm.py `generate`) gives rows of {"id", "prompt",
"reference", "answer"}; the loop shows them and scores them with these pure functions. Imports
rouge-score inside `text_metrics` only; never torch, ray or launcher.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

TABLE_COLUMNS = ("id", "prompt", "reference", "answer")


def _cell(value) -> str:
    """One markdown table cell: a pipe would end the cell, a newline the row."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The rows as a markdown table (what TensorBoard's text dashboard renders)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def stop_ids(*sources) -> list[int]:
    """Every end-of-sequence token id the sources name (each an id, a list of ids or None), once, in
    order: the tokenizer's eos and the model's generation config, whose list holds a chat model's
    end-of-turn token where it differs from eos (Llama 3's <|eot_id|>); generation stops at any of them."""
    ids: list[int] = []
    for source in sources:
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def before_after(before: Sequence[dict], after: Sequence[dict]) -> list[dict]:
    """test_generations.jsonl's rows: each example's answers before and after fine-tuning, by id."""
    answered = {r["id"]: r["answer"] for r in after}
    return [{"id": r["id"], "prompt": r["prompt"], "reference": r["reference"], "before": r["answer"],
             "after": answered[r["id"]]} for r in before]


def text_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """exact_match (the stripped answer equals the stripped reference) and rougeL_f1 (rouge-score's
    ROUGE-L F-measure: lowercased alphanumeric tokens, no stemming), each averaged over the rows."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    n = max(len(rows), 1)
    exact = sum(r["answer"].strip() == r["reference"].strip() for r in rows)
    rouge = sum(scorer.score(r["reference"], r["answer"])["rougeL"].fmeasure for r in rows)
    return {"exact_match": exact / n, "rougeL_f1": rouge / n}
