"""Regenerate the example QA data: python examples/data/make_qa.py

Short made-up biographies with questions about them, SQuAD style: each answer is a span of the context
given by its text and character offset; about one question in ten has no answer in its context (SQuAD 2.0
style). Some contexts are long enough to be split into several windows. Training data is JSON lines;
validation data is a nested SQuAD JSON file (data -> paragraphs -> qas), so the example exercises both
readers. Fixed seed: the files are reproducible.
"""

import json
import random
from pathlib import Path

FIRST = ["Maria", "John", "Aiko", "Omar", "Lena", "Rahul", "Chen", "Sofia", "Kwame", "Anna", "Pedro", "Ingrid"]
LAST = ["Garcia", "Smith", "Tanaka", "Haddad", "Fischer", "Mehta", "Wei", "Rossi", "Mensah", "Kowalska", "Alves"]
CITIES = ["Paris", "Tokyo", "Lagos", "Buenos Aires", "Berlin", "Mumbai", "Cape Town", "Oslo", "Seoul", "Lisbon"]
SUBJECTS = ["physics", "history", "medicine", "economics", "music", "architecture", "biology", "law"]
SCHOOLS = ["Greenfield University", "the Royal Academy", "Lakeside College", "the Institute of Science"]
COMPANIES = ["Acme Corporation", "Globex", "Initech", "Orbit Labs", "Northwind Traders", "Blue Harbor Bank"]
JOBS = ["engineer", "teacher", "surgeon", "analyst", "composer", "architect", "lawyer"]
FILLER = ["The weather that year was unusually warm.", "Local newspapers rarely covered such stories.",
          "Many friends remember long walks along the river.", "The family kept a small garden behind the house.",
          "Trains between the two cities were often late.", "A museum now stands where the old school was.",
          "Winters were long and the evenings were quiet.", "Several letters from that time still survive."]


def make_one(rng: random.Random) -> list[dict]:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    facts = {"city": rng.choice(CITIES), "year": str(rng.randint(1900, 1999)), "subject": rng.choice(SUBJECTS),
             "school": rng.choice(SCHOOLS), "company": rng.choice(COMPANIES), "job": rng.choice(JOBS)}
    sentences = [f"{name} was born in {facts['city']} in {facts['year']}.",
                 f"{name.split()[0]} studied {facts['subject']} at {facts['school']}.",
                 f"Later {name.split()[0]} worked as an {facts['job']} for {facts['company']}."
                 if facts["job"][0] in "aeiou" else
                 f"Later {name.split()[0]} worked as a {facts['job']} for {facts['company']}."]
    filler = rng.sample(FILLER, rng.randint(0, 6))  # long contexts need several windows
    for sentence in filler:
        sentences.insert(rng.randint(0, len(sentences)), sentence)
    context = " ".join(sentences)
    questions = [(f"Where was {name} born?", facts["city"]), (f"In which year was {name} born?", facts["year"]),
                 (f"What did {name} study?", facts["subject"]), (f"Where did {name} study?", facts["school"]),
                 (f"Which company did {name} work for?", facts["company"]),
                 (f"What was {name}'s job?", facts["job"]),
                 (f"Where did {name} retire?", None), (f"Who was {name}'s first teacher?", None)]
    question, text = rng.choice(questions[:6] if rng.random() < 0.9 else questions[6:])
    answers = {"text": [], "answer_start": []}
    if text is not None:
        answers = {"text": [text], "answer_start": [context.index(f" {text}") + 1]}
    return {"question": question, "context": context, "answers": answers}


def make(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"s{seed}-{i}", **make_one(rng)} for i in range(n)]


def squad_document(rows: list[dict]) -> dict:
    paragraphs = [{"context": r["context"], "qas": [{"id": r["id"], "question": r["question"],
                                                    "is_impossible": not r["answers"]["text"], "answers": [
        {"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}]}
        for r in rows]
    return {"version": "v2.0", "data": [{"title": "biographies", "paragraphs": paragraphs}]}


if __name__ == "__main__":
    here = Path(__file__).parent
    with open(here / "qa_train.jsonl", "w") as f:
        for row in make(320, seed=1):
            f.write(json.dumps(row) + "\n")
    (here / "qa_validation.json").write_text(json.dumps(squad_document(make(64, seed=2)), indent=1) + "\n")
