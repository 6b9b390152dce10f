"""Regenerate the example NER data: python examples/data/make_ner.py

Short news-style sentences with people, organisations and places (IOB2 tags, multi-word entities), built
from templates with a fixed seed so the files are reproducible. Training data is JSON lines
(``tokens``/``tags``); validation data is a CoNLL file (word and tag per line, blank line between
sentences), so the example exercises both readers.
"""

import json
import random
from pathlib import Path

PER = ["Maria Garcia", "John Smith", "Aiko Tanaka", "Omar Haddad", "Lena Fischer", "Rahul Mehta", "Chen Wei",
       "Sofia Rossi", "Kwame Mensah", "Anna Kowalska", "Pedro Alves", "Ingrid Berg", "Samuel Okafor", "Yuki Sato"]
ORG = ["Acme Corporation", "United Nations", "Globex", "Red Cross", "Initech", "World Bank", "Stark Industries",
       "Umbrella Health", "Northwind Traders", "Blue Harbor Bank", "Orbit Labs", "Greenfield University"]
LOC = ["New York", "Paris", "Tokyo", "Lagos", "Buenos Aires", "Berlin", "Mumbai", "Cape Town", "Oslo",
       "Mexico City", "Seoul", "Lisbon", "Nairobi", "San Francisco", "Warsaw"]
MONTHS = ["January", "March", "May", "July", "September", "November"]
TEMPLATES = [
    "{PER} works for {ORG} in {LOC} .",
    "{ORG} opened a new office in {LOC} in {MONTH} .",
    "{PER} met {PER} at the {LOC} airport .",
    "yesterday {PER} flew from {LOC} to {LOC} .",
    "the board of {ORG} appointed {PER} as chief executive .",
    "{PER} said that {ORG} will invest in {LOC} next year .",
    "shares of {ORG} rose after the announcement in {LOC} .",
    "{PER} , a spokesperson for {ORG} , declined to comment .",
    "the conference in {LOC} was opened by {PER} .",
    "{ORG} and {ORG} signed an agreement on Tuesday .",
]


def fill(template: str, rng: random.Random) -> dict:
    tokens, tags = [], []
    for part in template.split():
        kind = part.strip("{}") if part.startswith("{") else None
        if kind in ("PER", "ORG", "LOC"):
            words = rng.choice({"PER": PER, "ORG": ORG, "LOC": LOC}[kind]).split()
            tokens += words
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        else:
            tokens.append(rng.choice(MONTHS) if kind == "MONTH" else part)
            tags.append("O")
    tokens[0] = tokens[0][0].upper() + tokens[0][1:]
    return {"tokens": tokens, "tags": tags}


def make(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [fill(rng.choice(TEMPLATES), rng) for _ in range(n)]


if __name__ == "__main__":
    here = Path(__file__).parent
    with open(here / "ner_train.jsonl", "w") as f:
        for row in make(400, seed=1):
            f.write(json.dumps(row) + "\n")
    with open(here / "ner_validation.conll", "w") as f:
        f.write("\n".join("".join(f"{w} {t}\n" for w, t in zip(r["tokens"], r["tags"])) for r in make(80, seed=2)))
