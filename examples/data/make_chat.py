"""Regenerate the example chat data: python examples/data/make_chat.py

OpenAI chat fine-tuning records (a support assistant for a fictional phone, "Nimbus"), with system, user and
assistant turns and a few multi-turn conversations whose first answer has weight 0 (not trained on).
"""

import json
import random
from pathlib import Path

QA = [
    ("How do I reset my Nimbus phone?", "Hold the power and volume-down buttons for ten seconds, then choose Reset."),
    ("My battery drains fast. What can I do?", "Turn on Battery Saver in Settings and lower the screen brightness."),
    ("How do I update the software?", "Open Settings, tap System, then Software update, and follow the steps."),
    ("Can I use two SIM cards?", "Yes. The Nimbus takes one physical SIM and one eSIM."),
    ("How do I take a screenshot?", "Press the power and volume-down buttons at the same time."),
    ("Is the Nimbus waterproof?", "It is rated IP68: up to 1.5 metres of fresh water for 30 minutes."),
    ("How do I transfer my contacts?", "Use the Switch app: it copies contacts, photos and messages over Wi-Fi."),
    ("Where is my warranty information?", "Open Settings, tap About phone, then Warranty to see your dates."),
]
STYLES = ["", "Hi! ", "Hello, ", "Quick question: ", "Sorry to bother you, "]


def make(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = rng.choice(QA)
        messages = [{"role": "system", "content": "You are Nimbus Support. Answer in one short sentence."},
                    {"role": "user", "content": rng.choice(STYLES) + question}]
        if rng.random() < 0.25:
            q2, a2 = rng.choice(QA)
            messages += [{"role": "assistant", "content": a2, "weight": 0},
                         {"role": "user", "content": "Thanks. And " + question[0].lower() + question[1:]}]
        messages.append({"role": "assistant", "content": answer})
        rows.append({"messages": messages})
    return rows


if __name__ == "__main__":
    here = Path(__file__).parent
    for name, n, seed in [("chat_train.jsonl", 320, 1), ("chat_validation.jsonl", 40, 2)]:
        with open(here / name, "w") as f:
            for row in make(n, seed):
                f.write(json.dumps(row) + "\n")
