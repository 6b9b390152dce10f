"""Regenerate the example preference data: python examples/data/make_preference.py

OpenAI preference records (DPO) for the fictional "Nimbus" phone support assistant of make_chat.py: the preferred
output answers the question; the other answers a different question or brushes the user off.
"""

import json
import random
from pathlib import Path

from make_chat import QA, STYLES

BRUSH_OFFS = ["Please read the manual.", "I can't help with that.", "Contact the store where you bought it.",
              "That is not something I know about."]


def make(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        (question, answer), (_, other) = rng.sample(QA, 2)
        rejected = other if rng.random() < 0.5 else rng.choice(BRUSH_OFFS)
        messages = [{"role": "system", "content": "You are Nimbus Support. Answer in one short sentence."},
                    {"role": "user", "content": rng.choice(STYLES) + question}]
        rows.append({"input": {"messages": messages},
                     "preferred_output": [{"role": "assistant", "content": answer}],
                     "non_preferred_output": [{"role": "assistant", "content": rejected}]})
    return rows


if __name__ == "__main__":
    here = Path(__file__).parent
    for name, n, seed in [("preference_train.jsonl", 240, 3), ("preference_validation.jsonl", 40, 4)]:
        with open(here / name, "w") as f:
            for row in make(n, seed):
                f.write(json.dumps(row) + "\n")
