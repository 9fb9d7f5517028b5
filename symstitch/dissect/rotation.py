"""Rotations of a point's units for the rotation experiment (docs/method.md §6): a'(x) = Q^α a(x), with Q a
Haar-random rotation (det Q = +1) and α from 0 (the activation basis) to 1 (a random basis).

Q^α = exp(α log Q): for Q in SO(n) without the eigenvalue −1 (almost surely) the principal logarithm is a real
skew-symmetric matrix, so every Q^α is itself a rotation, and the path moves continuously from I to Q.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import expm, logm

from symstitch.symmetry import haar_orthogonal

Tensor = torch.Tensor


def haar_rotation(n: int, seed: int = 0) -> Tensor:
    """A Haar-random element of SO(n) (float64): a Haar orthogonal matrix with its first column's sign flipped
    where its determinant is −1."""
    Q = haar_orthogonal(n, torch.Generator().manual_seed(seed))
    if torch.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q


def rotation_power(Q: Tensor, alpha: float) -> Tensor:
    """Q^α = exp(α log Q) (float64) for Q in SO(n); exactly I at α = 0."""
    if alpha == 0:
        return torch.eye(Q.shape[0], dtype=torch.float64)
    log = logm(Q.double().numpy())
    log = np.real(log) if np.iscomplexobj(log) else log
    log = (log - log.T) / 2  # skew-symmetric up to rounding
    return torch.from_numpy(expm(alpha * log))


def rotate(activations: Tensor, M: Tensor) -> Tensor:
    """M·a over the unit dimension (dim 1) of (B, U, …) activations."""
    return torch.einsum("uv,bv...->bu...", M.to(activations), activations)
