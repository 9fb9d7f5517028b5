"""Per-unit thresholds of network dissection (docs/method.md §6): T_u, the (1 − q) quantile of unit u's
activations over every position of every image, at the feature map's own resolution.

The quantile is linear interpolation between order statistics (numpy's and ``torch.quantile``'s default): over n
values sorted ascending v_(0) ≤ … ≤ v_(n−1), position p = (1 − q)(n − 1), T = v_(⌊p⌋) + (p − ⌊p⌋)(v_(⌈p⌉) −
v_(⌊p⌋)). Only the k = n − ⌊p⌋ largest values enter it, so :class:`TopQuantile` keeps each unit's k largest
values as batches stream by and is **exact** with memory U · k, a fraction about q of all values.

Where U · k values exceed the memory budget it keeps a uniform random sample of the values instead (each kept
with probability r, seeded), and T is the sample's (1 − q) quantile: an **estimate**. Its error is stated as a
quantile level: with m sampled values, the estimate lies between the true (1 − q ∓ δ) quantiles with about 95 %
probability, δ = 1.96 · √(q(1 − q)/m) (the normal approximation of the binomial count above the threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

#: the default memory budget of the kept values, in float32 numbers (256 MB)
BUDGET = 1 << 26


@dataclass(frozen=True)
class QuantileInfo:
    """How the thresholds were found: ``exact``, or an estimate from ``sampled`` of ``values`` per unit, whose
    quantile level is within ± ``level_error`` of 1 − q (95 %)."""

    q: float
    values: int
    sampled: int
    exact: bool
    level_error: float

    def describe(self) -> str:
        if self.exact:
            return f"exact (1 − q) quantile over {self.values} values per unit"
        return (f"estimated from a uniform sample of {self.sampled} of {self.values} values per unit: its quantile "
                f"level is 1 − q ± {self.level_error:.2g} (95 %)")


def kept(n: int, q: float) -> int:
    """k = n − ⌊(1 − q)(n − 1)⌋: how many of the largest of n values the (1 − q) quantile depends on."""
    return n - math.floor((1.0 - q) * (n - 1))


def quantile_from_top(top: Tensor, n: int, q: float) -> Tensor:
    """The (1 − q) quantile of n values per row from the row's k ≥ :func:`kept` largest values ``top`` (any order)."""
    top = top.sort(dim=-1, descending=True).values
    p = (1.0 - q) * (n - 1)
    lo, frac = math.floor(p), p - math.floor(p)
    # ascending position i is descending position n − 1 − i
    below, above = top[..., n - 1 - lo], top[..., max(n - 1 - math.ceil(p), 0)]
    return below + frac * (above - below)


class TopQuantile:
    """Streams (B, U, …) activations and gives each unit's (1 − q) quantile over all of their values.

    ``total``: how many values each unit will see (images × positions), known before the first batch, so that k
    is known; ``budget``: the most numbers kept (beyond it, a seeded uniform sample: see the module)."""

    def __init__(self, units: int, q: float, total: int, budget: int = BUDGET, seed: int = 0):
        if not 0.0 < q < 1.0:
            raise ValueError(f"q is a fraction in (0, 1), got {q}")
        if total < 1:
            raise ValueError("no activations to take a quantile of")
        self.units, self.q, self.total = units, q, total
        self.rate, self.k = 1.0, kept(total, q)
        while units * self.k > budget and self.rate * total > 1:
            # a sample's size varies around its expectation r·n: keep enough for one 8 standard deviations larger
            self.rate = min(self.rate, budget / (units * self.k)) * 0.9
            expected = self.rate * total
            self.k = kept(int(expected + 8 * math.sqrt(expected)) + 8, q)
        if units * self.k > budget:
            raise ValueError(f"a memory budget of {budget} numbers cannot hold a quantile of {units} units")
        self.top = torch.empty(units, 0)
        self.seen = 0
        self.sampled = 0
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, activations: Tensor) -> None:
        """``activations``: (B, U, …) at the feature map's resolution."""
        values = activations.detach().float().transpose(0, 1).reshape(self.units, -1).cpu()
        self.seen += values.shape[1]
        if self.rate < 1.0:
            keep = torch.rand(values.shape[1], generator=self.generator) < self.rate
            values = values[:, keep]
        self.sampled += values.shape[1]
        merged = torch.cat([self.top, values], dim=1)
        self.top = merged.topk(min(self.k, merged.shape[1]), dim=1).values if merged.shape[1] > self.k else merged

    def compute(self) -> tuple[Tensor, QuantileInfo]:
        """T (U,) and how it was found."""
        if self.seen != self.total:
            raise ValueError(f"the quantile expected {self.total} values per unit and saw {self.seen}")
        n = self.sampled
        if n == 0:
            raise ValueError("the sample of activations is empty: raise the memory budget")
        exact = self.rate == 1.0
        need = kept(n, self.q)
        if self.top.shape[1] < need:
            raise ValueError("the sample came out larger than the kept values allow: raise the memory budget")
        top = self.top.sort(dim=1, descending=True).values[:, :need]
        error = 0.0 if exact else 1.96 * math.sqrt(self.q * (1 - self.q) / n)
        return quantile_from_top(top, n, self.q), QuantileInfo(self.q, self.total, n, exact, error)


def exact_quantile(activations: Tensor, q: float) -> Tensor:
    """The reference: (1 − q) quantile per unit of (N, U, …) activations held whole (tests, small inputs)."""
    values = activations.transpose(0, 1).reshape(activations.shape[1], -1).double()
    return torch.quantile(values, 1.0 - q, dim=1, interpolation="linear").to(activations.dtype)

