"""Generate the shipped data sets of the classification configs (deterministic; run once):

- topics.jsonl: text classification, 4 topics (text, label)
- ner_tiny.jsonl: named entities in BIO tags (tokens, tags)
- srl_tiny.jsonl: semantic roles in BIO tags with the predicate's word index (tokens, tags, predicate)
- digits.parquet: scikit-learn's 8x8 handwritten digits (1,797 real images) as PNG images, label 0-9
  (needs scikit-learn and pillow only here, at generation time)

Run: python data/make_task_data.py
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
rng = random.Random(0)

TOPICS = {
    "sports": ["The {team} won the match {when}", "Our striker scored twice against {team}",
               "The coach praised the {team} defence after the game", "Fans cheered as the {team} took the title",
               "The referee stopped the game in the second half", "{name} broke the marathon record {when}"],
    "weather": ["Heavy rain is expected in {city} {when}", "A cold front will bring snow to {city}",
                "Temperatures in {city} will climb above thirty degrees", "Strong winds closed the roads near {city}",
                "The forecast for {city} shows sunshine {when}", "Fog delayed flights at {city} airport"],
    "food": ["{name} baked a loaf of sourdough bread", "This soup needs more garlic and pepper",
             "The new restaurant in {city} serves fresh pasta", "{name} cooked rice with beans and spicy sauce",
             "Add sugar and butter, then stir the batter", "The chef grilled fish with lemon {when}"],
    "technology": ["The new phone ships with a faster chip", "{name} released an update for the database",
                   "Engineers in {city} built a quantum computer", "The laptop battery now lasts twelve hours",
                   "A software bug crashed the servers {when}", "{name} wrote a compiler for the language"],
}
SLOTS = {"team": ["Lions", "Rovers", "Falcons", "United", "Tigers"], "when": ["today", "on Sunday", "last night",
         "this week", "tomorrow"], "city": ["Paris", "Oslo", "Lima", "Cairo", "Denver", "Osaka"],
         "name": ["Maria", "John", "Aiko", "Pedro", "Fatima", "Liam"]}

PEOPLE = ["Maria Lopez", "John Smith", "Aiko Tanaka", "Pedro Alves", "Fatima Khan", "Liam Brown", "Ana", "Omar"]
PLACES = ["Paris", "New York", "Lima", "Cairo", "Oslo", "Buenos Aires", "Osaka", "Denver"]
ORGS = ["Acme Corp", "the United Nations", "Globex", "Red Cross", "Initech", "the World Bank"]
NER_TEMPLATES = ["{PER} works for {ORG} in {LOC} .", "{PER} visited {LOC} last year .",
                 "{ORG} opened an office in {LOC} .", "Yesterday {PER} met {PER} at {ORG} .",
                 "{PER} moved from {LOC} to {LOC} .", "The report by {ORG} was praised by {PER} ."]


def fill(template: str) -> str:
    out = template
    for key, values in SLOTS.items():
        while "{" + key + "}" in out:
            out = out.replace("{" + key + "}", rng.choice(values), 1)
    return out


def topics():
    rows = [{"text": fill(t), "label": label} for label, ts in TOPICS.items() for t in ts for _ in range(18)]
    rng.shuffle(rows)
    return rows


def ner():
    rows = []
    pools = {"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS}
    for _ in range(400):
        tokens, tags = [], []
        for piece in rng.choice(NER_TEMPLATES).split():
            kind = piece[1:-1] if piece.startswith("{") else None
            if kind:
                words = rng.choice(pools[kind]).split()
                tokens += words
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
            else:
                tokens.append(piece)
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def srl():
    """'<ARG0> <V> <ARG2> <ARG1> <ARGM-TMP>' frames; the predicate is marked by its word index."""
    verbs = ["gave", "sent", "sold", "showed", "lent"]
    objects = ["a book", "the old car", "two letters", "some bread", "a small gift"]
    times = ["yesterday", "on Monday", "last week", "in the morning"]
    rows = []
    for _ in range(300):
        parts = [("ARG0", rng.choice(PEOPLE)), ("V", rng.choice(verbs)), ("ARG2", rng.choice(PEOPLE)),
                 ("ARG1", rng.choice(objects))]
        if rng.random() < 0.6:
            parts.append(("ARGM-TMP", rng.choice(times)))
        tokens, tags, predicate = [], [], 0
        for role, text in parts:
            words = text.split()
            if role == "V":
                predicate = len(tokens)
            tokens += words
            tags += [f"B-{role}"] + [f"I-{role}"] * (len(words) - 1)
        tokens.append(".")
        tags.append("O")
        rows.append({"tokens": tokens, "tags": tags, "predicate": predicate})
    return rows


def digits(path: Path) -> None:
    import io

    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = []
    for img in d.images:  # 8x8, values 0..16
        buf = io.BytesIO()
        Image.fromarray((img * 255 / 16).astype("uint8"), mode="L").save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"image": images, "label": [int(x) for x in d.target]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    ds.to_parquet(str(path))


def write_jsonl(name: str, rows) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {HERE / name}")


if __name__ == "__main__":
    write_jsonl("topics.jsonl", topics())
    write_jsonl("ner_tiny.jsonl", ner())
    write_jsonl("srl_tiny.jsonl", srl())
    digits(HERE / "digits.parquet")
    print(f"wrote {HERE / 'digits.parquet'}")
