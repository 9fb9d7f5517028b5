"""Weight matching (docs/method.md §7): coordinate descent over the alignment sites on ‖θ_A − g·θ_B‖².

At each step one site s is solved with every other site held at its current element (B's weights as the descent
has aligned them so far, kept as float64 working copies and edited by index: B itself is never touched). Its units touch three kinds
of weights: rows that g's scales multiply (``a``: a producer's weight and bias without BatchNorm, else the
BatchNorm's γ and β), rows that only g's permutation moves (``w``: the convolution before a BatchNorm) and
columns of the layers that read the site, which absorb g⁻¹ (``c``). Pairing A's unit i with B's unit j at scale d
costs

    f_ij(d) = ‖a_i − d a'_j‖² + ‖w_i − w'_j‖² + ‖c_i − c'_j / d‖²

(primes: B with the current alignment). Permutations only: d = 1, the step is git-re-basin's, the Hungarian
method on Σ ⟨a_i, a'_j⟩ + ⟨w_i, w'_j⟩ + ⟨c_i, c'_j⟩. Signed permutations: d = ±1, whichever is better per pair.
Positive scales (G_ReLU): d_ij = argmin_{d > 0} f_ij(d) for every pair (a search over log d on a grid, then
safeguarded Newton steps), and the Hungarian method on min_d f_ij. The step's element Δ = P_π·diag(d) is applied
to the working copies (:class:`Working`: rows and columns gathered, scales multiplied) and composed into the
site's g. Sites are visited in a random
order (``seed``) until a whole pass moves no unit and no scale by more than ``tol``, or ``max_iter`` passes.
Each step can only lower the objective, which is bounded below, so the descent converges (to a local minimum).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from scipy.optimize import linear_sum_assignment

from symstitch.merge.methods import METHODS
from symstitch.merge.sites import AlignmentSite
from symstitch.network import PointNetwork, Site
from symstitch.symmetry import compose

Tensor = torch.Tensor

#: log d is searched in [−LOG_RANGE, LOG_RANGE] (d from 0.0025 to 400)
LOG_RANGE = 6.0
_GRID = 25
_NEWTON = 12
#: once the permutations have settled, a scale step moves log d by this multiple of its optimum (successive
#: over-relaxation: without BatchNorm the scales of consecutive sites are coupled, and plain coordinate descent
#: creeps towards them)
OVER_RELAXATION = 1.8


class Working:
    """float64 copies of the tensors the alignment sites touch (B's, as the descent aligns it), edited by index: a
    step's permutation gathers rows or columns, its scales multiply them; B itself is never touched."""

    def __init__(self, sites: dict[str, Site], points: list[str]):
        self.tensors: dict[int, Tensor] = {}
        for point in points:
            for segment in sites[point].segments:
                for layer, norm in segment.producers:
                    for t in (layer.weight, layer.bias, *((norm.weight, norm.bias) if norm is not None else ())):
                        if t is not None:
                            self.tensors.setdefault(id(t), t.detach().to("cpu", torch.float64).clone())
                for consumer in segment.consumers:
                    self.tensors.setdefault(id(consumer.weight), consumer.weight.detach().to("cpu", torch.float64).clone())

    def __call__(self, t: Tensor) -> Tensor:
        return self.tensors[id(t)]

    def step(self, site: Site, lo: int, hi: int, perm: Tensor, d: Tensor) -> None:
        """Δ = P_π·diag(d) on units ``lo … hi − 1`` of a site: a producer's new row i is d_π(i) times its row π(i)
        (BatchNorm: the convolution's rows only permuted, γ and β scaled), a reader's new column i its column π(i)
        divided by d_π(i) (W ← W Δ⁻¹)."""
        idx, scale = perm + lo, d[perm]
        for segment in site.segments:
            if segment.size < hi:  # the blocks end where segments end: this one holds none of these units
                continue
            for layer, norm in segment.producers:
                plain = (layer.weight, layer.bias) if norm is not None else ()
                scaled = (norm.weight, norm.bias) if norm is not None else (layer.weight, layer.bias)
                for t in plain:
                    if t is not None:
                        w = self(t)
                        w[lo:hi] = w[idx]
                for t in scaled:
                    if t is not None:
                        w = self(t)
                        w[lo:hi] = scale.view(-1, *[1] * (w.dim() - 1)) * w[idx]
            for consumer in segment.consumers:
                w = self(consumer.weight)
                w[:, lo:hi] = w[:, idx] / scale.view(1, -1, *[1] * (w.dim() - 2))


def unit_weights(site: Site, lo: int, hi: int, values: Optional[Working] = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, w, c)`` of units ``lo … hi − 1`` of a site (module docstring), float64, one row per unit; the tensors'
    current values from ``values`` (the descent's working copies) or the network's own."""
    n = hi - lo
    value = values if values is not None else (lambda t: t.detach().to("cpu", torch.float64))
    scaled, plain, inverse = [], [], []
    for segment in site.segments:
        if segment.size < hi:
            continue
        for layer, norm in segment.producers:
            rows = [value(layer.weight)[lo:hi].reshape(n, -1)]
            if layer.bias is not None:
                rows.append(value(layer.bias)[lo:hi, None])
            if norm is None:
                scaled += rows
            else:
                plain += rows
                scaled += [value(norm.weight)[lo:hi, None], value(norm.bias)[lo:hi, None]]
        for consumer in segment.consumers:
            inverse.append(value(consumer.weight)[:, lo:hi].transpose(0, 1).reshape(n, -1))

    def cat(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts, dim=1) if parts else torch.zeros(n, 0, dtype=torch.float64)

    return cat(scaled), cat(plain), cat(inverse)


def _scaled_cost(alpha: Tensor, beta: Tensor, gamma: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """min over d > 0 of h(d) = α d² − 2β d + γ / d² − 2δ / d for every pair (α, γ per column, β, δ per pair):
    ``(h_min, d)``. In t = log d: the best point of a grid, then safeguarded Newton steps inside the grid cell's
    bracket (a bisection where h'' ≤ 0 or Newton would leave it), which converge to machine precision."""
    def h(t: Tensor) -> Tensor:
        e = t.exp()
        return alpha * e * e - 2 * beta * e + gamma / (e * e) - 2 * delta / e

    grid = torch.linspace(-LOG_RANGE, LOG_RANGE, _GRID, dtype=torch.float64)
    shape = torch.broadcast_shapes(alpha.shape, beta.shape)
    best_value = torch.full(shape, math.inf, dtype=torch.float64)
    best = torch.zeros(shape, dtype=torch.float64)
    for t in grid:
        value = h(t.expand(shape))
        better = value < best_value
        best_value = torch.where(better, value, best_value)
        best = torch.where(better, t, best)
    step = float(grid[1] - grid[0])
    lo, hi, t = (best - step).clamp(min=-LOG_RANGE), (best + step).clamp(max=LOG_RANGE), best
    for _ in range(_NEWTON):
        e, f = t.exp(), (-t).exp()
        d1 = 2 * alpha * e * e - 2 * beta * e - 2 * gamma * f * f + 2 * delta * f  # h'(t)
        d2 = 4 * alpha * e * e - 2 * beta * e + 4 * gamma * f * f - 2 * delta * f  # h''(t)
        lo = torch.where(d1 < 0, t, lo)  # the minimum lies on the descending side
        hi = torch.where(d1 > 0, t, hi)
        newton = t - d1 / torch.where(d2 > 0, d2, torch.ones_like(d2))
        t = torch.where((d2 > 0) & (newton >= lo) & (newton <= hi), newton, (lo + hi) / 2)
    t = torch.where((alpha + gamma == 0).expand_as(t), torch.zeros_like(t), t)  # nothing scales: d = 1
    value = h(t)
    keep = best_value < value  # Newton never does worse than the grid: keep the grid's point if it did
    return torch.where(keep, best_value, value), torch.where(keep, best, t).exp()


def block_step(a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor], scales: str) -> tuple[Tensor, Tensor]:
    """``(π, d)`` of one block: the pairing and scales minimising Σ_i f_{i, π(i)} (module docstring), d indexed
    by B's units as :func:`~symstitch.symmetry.compose` takes them."""
    (sa, wa, ca), (sb, wb, cb) = a, b
    beta, delta, plain = sa @ sb.T, ca @ cb.T, wa @ wb.T
    if scales == "none":
        score, d = beta + delta + plain, torch.ones_like(beta)
    elif scales == "sign":
        signed = beta + delta
        score, d = signed.abs() + plain, torch.where(signed < 0, -1.0, 1.0).to(beta)
    else:
        alpha, gamma = (sb * sb).sum(1)[None, :], (cb * cb).sum(1)[None, :]
        cost, d = _scaled_cost(alpha, beta, gamma, delta)
        if scales == "nonzero":  # d < 0 as well: d = −e^t turns (β, δ) into (−β, −δ)
            cost_neg, d_neg = _scaled_cost(alpha, -beta, gamma, -delta)
            d = torch.where(cost_neg < cost, -d_neg, d)
            cost = torch.minimum(cost, cost_neg)
        score = 2 * plain - cost  # −f up to terms of one row or one column, which no pairing changes
    _, cols = linear_sum_assignment(score.numpy(), maximize=True)
    perm = torch.as_tensor(cols, dtype=torch.long)
    rows = torch.arange(len(perm))
    out = torch.empty(len(perm), dtype=torch.float64)
    out[perm] = d[rows, perm]
    return perm, out


def objective(a_sites: dict[str, Site], b_sites: dict[str, Site], sites: list[AlignmentSite],
              values: Optional[Working] = None) -> float:
    """Σ over the sites' weights of ‖θ_A − θ_B‖² (each tensor counted once per site that touches it; B's values
    from ``values`` where given)."""
    total = 0.0
    for site in sites:
        for lo, hi in site.block_ranges():
            for x, y in zip(unit_weights(a_sites[site.point], lo, hi),
                            unit_weights(b_sites[site.point], lo, hi, values)):
                total += float((x - y).square().sum())
    return total


@METHODS.register("weight")
def weight_matching(a: PointNetwork, b: PointNetwork, sites: list[AlignmentSite], *, max_iter: int = 100,
                    seed: int = 0, tol: float = 1e-7) -> tuple[dict[str, Tensor], dict]:
    """g at every site by coordinate descent (module docstring), on float64 working copies of B's weights."""
    a_sites, b_sites = a.symmetry_sites(), b.symmetry_sites()
    work = Working(b_sites, [s.point for s in sites])
    elements = {s.point: torch.eye(s.size, dtype=torch.float64) for s in sites}
    fixed = {(s.point, lo): unit_weights(a_sites[s.point], lo, hi) for s in sites for lo, hi in s.block_ranges()}
    generator = torch.Generator().manual_seed(seed)
    passes, converged, settled = 0, False, False
    for passes in range(1, max_iter + 1):
        moved = permuted = False
        for k in torch.randperm(len(sites), generator=generator).tolist():
            site = sites[k]
            blocks = []
            for lo, hi in site.block_ranges():
                perm, d = block_step(fixed[site.point, lo], unit_weights(b_sites[site.point], lo, hi, work),
                                     site.scales)
                identity = torch.equal(perm, torch.arange(len(perm)))
                if not identity:
                    moved = permuted = True
                elif float((d.abs().log()).abs().max()) > tol:
                    moved = True
                    if settled and site.scales == "positive":
                        d = d**OVER_RELAXATION
                if not identity or not torch.equal(d, torch.ones_like(d)):
                    work.step(b_sites[site.point], lo, hi, perm, d)
                blocks.append(compose(perm, d))
            elements[site.point] = torch.block_diag(*blocks) @ elements[site.point]
        if not moved:
            converged = True
            break
        settled = not permuted  # a pass that moved only scales: from now on the scale steps are over-relaxed
    return elements, {"passes": passes, "converged": converged,
                      "distance": objective(a_sites, b_sites, sites, work)}


__all__ = ["Working", "block_step", "objective", "unit_weights", "weight_matching"]
