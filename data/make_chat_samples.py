"""Generate data/alpaca_tiny.json and data/sharegpt_tiny.json: the house-style tasks of sft_tiny.jsonl
in the two formats LLaMA-Factory's dataset_info.json is built on, as those files are written (a JSON
array of rows).

- Alpaca: instruction + input (the word or numbers the task is about) -> output; some rows carry a
  system prompt, some a history of earlier [instruction, output] pairs.
- ShareGPT: two- and three-exchange conversations (human/gpt), some with a system turn, and a few
  with a tool: `tools` as a JSON string, a function_call turn and its observation.
Run: python data/make_chat_samples.py
"""
import json
import random
from pathlib import Path

from make_sft_tiny import ANTONYMS, CAPITALS, WORDS

SYSTEM = "You answer in the house style: 'Answer: ...' and one sentence of reason."
TOOLS = [{"name": "capital_of", "description": "The capital city of a country",
          "parameters": {"type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]}}]


def tasks(rng: random.Random):
    """(instruction, input, output) triples."""
    for _ in range(60):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        yield "Add the two numbers.", f"{a} and {b}", f"Answer: {a + b}. Adding {a} and {b} gives {a + b}."
    for country, city in CAPITALS.items():
        yield "Name the capital of this country.", country, f"Answer: {city}. The capital of {country} is {city}."
    for word, opposite in ANTONYMS.items():
        yield "Give the opposite of this word.", word, f"Answer: {opposite}. The opposite of '{word}' is '{opposite}'."
    for _ in range(50):
        word = rng.choice(WORDS)
        yield "Write this word in capital letters.", word, f"Answer: {word.upper()}. In capitals, '{word}' is {word.upper()}."
    for _ in range(50):
        word = rng.choice(WORDS)
        yield "Count the letters of this word.", word, f"Answer: {len(word)}. The word '{word}' has {len(word)} letters."


def alpaca(rows: list[tuple[str, str, str]], rng: random.Random) -> list[dict]:
    out = []
    for i, (instruction, query, output) in enumerate(rows):
        row = {"instruction": instruction, "input": query, "output": output}
        if i % 5 == 0:
            row["system"] = SYSTEM
        if i % 7 == 0:
            earlier = rng.choice(rows)
            row["history"] = [[f"{earlier[0]}\n{earlier[1]}", earlier[2]]]
        out.append(row)
    return out


def sharegpt(rows: list[tuple[str, str, str]], rng: random.Random) -> list[dict]:
    out = []
    for i in range(0, len(rows) - 2, 2):
        turns = []
        for instruction, query, output in rows[i:i + (3 if i % 6 == 0 else 2)]:
            turns += [{"from": "human", "value": f"{instruction} {query}"}, {"from": "gpt", "value": output}]
        row = {"conversations": turns}
        if i % 4 == 0:
            row["system"] = SYSTEM
        out.append(row)
    for country, city in list(CAPITALS.items())[:12]:
        out.append({"conversations": [
            {"from": "human", "value": f"Look up the capital of {country}."},
            {"from": "function_call", "value": json.dumps({"name": "capital_of", "arguments": {"country": country}})},
            {"from": "observation", "value": json.dumps({"capital": city})},
            {"from": "gpt", "value": f"Answer: {city}. The capital of {country} is {city}."}],
            "tools": json.dumps(TOOLS)})
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(0)
    rows = list(tasks(rng))
    rng.shuffle(rows)
    here = Path(__file__).parent
    for name, made in (("alpaca_tiny.json", alpaca(rows, rng)), ("sharegpt_tiny.json", sharegpt(rows, rng))):
        (here / name).write_text(json.dumps(made, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {len(made)} rows to {here / name}")


if __name__ == "__main__":
    main()
