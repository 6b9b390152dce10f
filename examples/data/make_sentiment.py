"""Regenerate the example sentiment data: python examples/data/make_sentiment.py

Short product and film reviews in three classes, built from templates with a fixed seed so the files are
reproducible. Small enough to train on a laptop CPU in a couple of minutes.
"""

import json
import random
from pathlib import Path

SUBJECTS = ["the movie", "this phone", "the hotel", "the restaurant", "this book", "the service", "the laptop",
            "the concert", "this game", "the app", "the headphones", "the coffee", "the delivery", "the staff",
            "the camera", "the show", "this album", "the flight", "the course", "the update"]
POSITIVE = ["was wonderful", "exceeded my expectations", "is absolutely fantastic", "made my day",
            "was a delight", "is the best I have tried", "works perfectly", "was brilliant and fun",
            "is worth every penny", "left me very happy", "was superb", "is excellent"]
NEGATIVE = ["was terrible", "broke after two days", "is a complete waste of money", "ruined my evening",
            "was rude and slow", "is the worst I have tried", "keeps crashing", "was boring and too long",
            "is overpriced junk", "left me very disappointed", "was awful", "is badly made"]
NEUTRAL = ["arrived on tuesday", "is available in three colours", "was about what I expected",
           "has an average rating", "is sold in most shops", "was neither good nor bad", "runs on batteries",
           "is two hours long", "was fine, nothing special", "comes in a cardboard box", "is okay I guess",
           "has a standard design"]
EXTRAS = ["", "", "Honestly,", "Overall,", "To be fair,", "I think", "In short,", "Well,"]
ENDINGS = ["", ".", "!", " - would say so again.", ", as a friend told me too.", "."]


def make(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label, phrases = rng.choice([("positive", POSITIVE), ("negative", NEGATIVE), ("neutral", NEUTRAL)])
        text = " ".join(x for x in [rng.choice(EXTRAS), rng.choice(SUBJECTS), rng.choice(phrases)] if x)
        rows.append({"text": (text + rng.choice(ENDINGS)).strip(), "label": label})
    return rows


if __name__ == "__main__":
    here = Path(__file__).parent
    for name, n, seed in [("sentiment_train.jsonl", 480, 1), ("sentiment_validation.jsonl", 120, 2)]:
        with open(here / name, "w") as f:
            for row in make(n, seed):
                f.write(json.dumps(row) + "\n")
