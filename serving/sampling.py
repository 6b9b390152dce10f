"""A request's sampling parameters and how one next token is drawn from a row of logits.

Each request draws from its own ``torch.Generator`` (seeded by the request's ``seed``), so a seed gives the same
text whether the request ran alone or batched with others: no request's draws consume another's random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        """A fresh random stream for one generation: ``seed``'s, else a random one."""
        rng = torch.Generator()
        rng.manual_seed(self.seed) if self.seed is not None else rng.seed()
        return rng


def sample(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator) -> int:
    """Greedy at temperature 0, else nucleus sampling (the smallest set of tokens with mass >= top_p)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    # In float64 (a float32 tensor would round a temperature below ~1e-45 to 0) and shifted so the largest logit
    # is 0: a temperature near 0 sends the others to -inf (probability 0), never to inf - inf = NaN, so it
    # samples like greedy instead of failing.
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=rng))
