"""Generate data/sft_tiny.jsonl: a small, deterministic instruction-following set (prompt/response).

Each response follows a fixed house style ("Answer: ..." plus a short rationale), so fine-tuning has
something clear to learn within a few minutes on a CPU. Run: python data/make_sft_tiny.py
"""
import json
import random
from pathlib import Path

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Poland": "Warsaw", "Greece": "Athens", "Chile": "Santiago", "Cuba": "Havana", "India": "New Delhi",
            "Ireland": "Dublin", "Austria": "Vienna", "Portugal": "Lisbon", "Sweden": "Stockholm",
            "Turkey": "Ankara", "Vietnam": "Hanoi", "Thailand": "Bangkok", "Mexico": "Mexico City",
            "Argentina": "Buenos Aires", "Finland": "Helsinki", "Hungary": "Budapest", "Denmark": "Copenhagen"}
ANTONYMS = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "early": "late", "light": "dark",
            "open": "closed", "full": "empty", "strong": "weak", "old": "young", "rich": "poor", "high": "low",
            "wet": "dry", "loud": "quiet", "hard": "soft", "up": "down", "near": "far", "thick": "thin"}
WORDS = ["apple", "river", "planet", "garden", "window", "silver", "rocket", "pencil", "forest", "candle",
         "marble", "castle", "bridge", "rabbit", "winter", "orange", "guitar", "meadow", "harbor", "tunnel"]


def examples(rng: random.Random):
    for _ in range(90):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        yield f"What is {a} plus {b}?", f"Answer: {a + b}. Adding {a} and {b} gives {a + b}."
    for country, city in CAPITALS.items():
        yield f"What is the capital of {country}?", f"Answer: {city}. The capital of {country} is {city}."
    for word, opposite in ANTONYMS.items():
        yield f"Give the opposite of the word '{word}'.", f"Answer: {opposite}. The opposite of '{word}' is '{opposite}'."
    for _ in range(80):
        word = rng.choice(WORDS)
        yield f"Write the word '{word}' in capital letters.", f"Answer: {word.upper()}. In capitals, '{word}' is {word.upper()}."
    for _ in range(80):
        word = rng.choice(WORDS)
        yield f"How many letters are in the word '{word}'?", f"Answer: {len(word)}. The word '{word}' has {len(word)} letters."
    for _ in range(60):
        nums = rng.sample(range(1, 60), 4)
        s = ", ".join(map(str, sorted(nums)))
        yield (f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}.",
               f"Answer: {s}. From smallest to largest the numbers are {s}.")


def main() -> None:
    rng = random.Random(0)
    rows = [{"prompt": p, "response": r} for p, r in examples(rng)]
    rng.shuffle(rows)
    out = Path(__file__).with_name("sft_tiny.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
