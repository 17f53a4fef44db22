"""Generate data/pref_tiny.jsonl: a small, deterministic preference set (TRL's standard format:
prompt / chosen / rejected as strings) from data/sft_tiny.jsonl, for model.task: preference.

`chosen` is the house-style answer of data/sft_tiny.jsonl; `rejected` is wrong in one of three ways
a tuned model should learn to avoid: another prompt's answer (right style, wrong content), an
evasive non-answer, or the right answer without its "Answer: ..." line. Run: python data/make_pref_tiny.py
"""
import json
import random
from pathlib import Path

EVASIVE = ["I am not sure about that.", "Sorry, I cannot help with this question.", "That depends on many things.",
           "Please ask someone else.", "I would rather not say."]


def pairs(rows: list[dict], rng: random.Random):
    for i, row in enumerate(rows):
        kind = i % 3
        if kind == 0:  # another row's answer, in the same style
            other = rows[(i + rng.randint(1, len(rows) - 1)) % len(rows)]["response"]
            rejected = other if other != row["response"] else rng.choice(EVASIVE)
        elif kind == 1:
            rejected = rng.choice(EVASIVE)
        else:  # the rationale alone, without the "Answer: ..." line the style asks for
            rejected = row["response"].split(". ", 1)[-1]
        yield {"prompt": row["prompt"], "chosen": row["response"], "rejected": rejected}


def main() -> None:
    here = Path(__file__).parent
    rows = [json.loads(line) for line in (here / "sft_tiny.jsonl").read_text().splitlines()]
    out = list(pairs(rows, random.Random(0)))
    assert all(p["chosen"] != p["rejected"] for p in out)
    (here / "pref_tiny.jsonl").write_text("".join(json.dumps(p) + "\n" for p in out))
    print(f"wrote {len(out)} pairs to {here / 'pref_tiny.jsonl'}")


if __name__ == "__main__":
    main()
