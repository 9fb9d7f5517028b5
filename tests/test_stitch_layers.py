"""Stitching layers T (docs/method.md §2): shapes, the matrix they apply, projections, hardening, recovery of g ∈ G_σ."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linprog, minimize

from symstitch import stitch_layers as SL
from symstitch import symmetry as S

C = 6
NAMES = SL.STITCH_LAYERS.available()
PROJECTIONS = SL.PROJECTIONS.available()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def _layer(name: str, seed: int = 0, **kw) -> SL.StitchLayer:
    """A float64 layer with a nonzero bias (when it has one)."""
    torch.manual_seed(seed)
    layer = SL.build_stitch_layer(name, C, **kw).double()
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(torch.randn(C, dtype=torch.float64))
    return layer


def _tokens(h: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, H·W, C)."""
    return h.flatten(2).transpose(1, 2)


def _random_doubly_stochastic(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A convex combination of k random permutation matrices (a point of the Birkhoff polytope)."""
    weights = torch.rand(k, generator=gen, dtype=torch.float64)
    weights /= weights.sum()
    eye = torch.eye(n, dtype=torch.float64)
    return sum(w * eye[torch.randperm(n, generator=gen)] for w in weights)


def _assert_doubly_stochastic(W: torch.Tensor, atol: float) -> None:
    assert torch.isfinite(W).all()
    assert (W >= 0).all()
    ones = torch.ones(W.shape[0], dtype=W.dtype)
    torch.testing.assert_close(W.sum(0), ones, rtol=0, atol=atol)
    torch.testing.assert_close(W.sum(1), ones, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------------------
# Every layer: the map it applies


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_applies_matrix_on_channels_for_images_and_tokens(name, mode):
    layer = _layer(name).train(mode == "train")
    h = torch.randn(3, C, 4, 5, dtype=torch.float64)
    y = layer(h)
    assert y.shape == h.shape
    T = layer.matrix()
    expected = torch.einsum("oc,nchw->nohw", T, h) + layer.bias[None, :, None, None]
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    y_tokens = layer(_tokens(h))
    assert y_tokens.shape == (3, 20, C)
    torch.testing.assert_close(y_tokens, _tokens(y), rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(h[:, :, 0, 0]), y[:, :, 0, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_without_bias(name):
    layer = _layer(name, bias=False)
    h = torch.randn(2, C, 3, 3, dtype=torch.float64)
    assert layer.bias is None
    torch.testing.assert_close(layer(h), torch.einsum("oc,nchw->nohw", layer.matrix(), h), rtol=0, atol=1e-12)


def _batch_norm(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per channel (dim 1) of (N, C, H, W); BatchNorm's affine parameters start at γ = 1, β = 0."""
    return (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)


@pytest.mark.parametrize("norm", ["before", "after"])
def test_batch_norm_placement_uses_batch_statistics_then_running_ones(norm):
    layer = _layer("standard", norm=norm)
    h = 2 + 3 * torch.randn(4, C, 3, 3, dtype=torch.float64)
    T, b = layer.matrix().detach(), layer.bias.detach()

    def linear(x):
        return torch.einsum("oc,nchw->nohw", T, x) + b[None, :, None, None]

    def stats(x):
        return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)

    with torch.no_grad():
        y_train = layer(h)
    if norm == "before":
        expected = linear(_batch_norm(h, *stats(h)))
    else:
        expected = _batch_norm(linear(h), *stats(linear(h)))
    torch.testing.assert_close(y_train, expected, rtol=0, atol=1e-10)
    assert torch.allclose(layer(_tokens(h)), _tokens(y_train), rtol=0, atol=1e-10)

    layer.eval()
    bn = layer.norm_before if norm == "before" else layer.norm_after
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    with torch.no_grad():
        y_eval = layer(h)
    expected = linear(_batch_norm(h, mean, var)) if norm == "before" else _batch_norm(linear(h), mean, var)
    torch.testing.assert_close(y_eval, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=0)  # eval: statistics untouched


@pytest.mark.parametrize("name", NAMES)
def test_describe_is_json_and_regularization_is_a_scalar(name):
    layer = _layer(name)
    for _ in range(2):  # relaxed, then hardened
        info = layer.describe()
        assert json.loads(json.dumps(info))["layer"] == name
        assert info["hardened"] is layer.hardened
        reg = layer.regularization()
        assert reg.shape == ()
        assert reg.requires_grad == (name == "lasso" or (name == "birkhoff" and not layer.hardened))
        layer.harden()


def test_regularization_values():
    birkhoff = _layer("birkhoff", alpha=0.5)
    torch.testing.assert_close(birkhoff.regularization(), -0.5 * birkhoff.W.detach().pow(2).sum().sqrt())
    lasso = _layer("lasso", lam=0.25)
    torch.testing.assert_close(lasso.regularization(), 0.25 * lasso.weight.detach().abs().sum())


def test_unknown_names_and_bad_arguments_fail_clearly():
    with pytest.raises(KeyError, match="available: " + ", ".join(NAMES)):
        SL.build_stitch_layer("orthogonal", C)
    with pytest.raises(ValueError, match="norm must be one of 'none', 'before', 'after'"):
        SL.build_stitch_layer("standard", C, norm="layer")
    with pytest.raises(KeyError, match="euclidean, sinkhorn"):
        SL.build_stitch_layer("birkhoff", C, projection="dykstra")
    with pytest.raises(ValueError, match="no intertwiner group"):
        SL.build_stitch_layer("birkhoff", C, activation=torch.nn.Softplus())
    with pytest.raises(ValueError, match=r"\(N, L, 6\)"):
        SL.build_stitch_layer("standard", C)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="rank must be in 1..6"):
        SL.build_stitch_layer("lowrank", C, rank=7)


# ----------------------------------------------------------------------------------------------------------
# Projections onto the Birkhoff polytope


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_birkhoff_weight_stays_doubly_stochastic_after_every_step(projection):
    torch.manual_seed(0)
    layer = SL.build_stitch_layer("birkhoff", 8, projection=projection)
    h, target = torch.rand(16, 8, 3, 3), 5 * torch.randn(16, 8, 3, 3)
    opt = torch.optim.SGD(layer.parameters(), lr=5.0)
    _assert_doubly_stochastic(layer.W.detach(), atol=1e-5)
    for step in range(15):
        opt.zero_grad()
        (F.mse_loss(layer(h), target) + layer.regularization()).backward()
        opt.step()
        if step == 7:
            with torch.no_grad():
                layer.W[2] = -1.0  # a step that leaves a whole row negative
        assert (layer.W < 0).any()  # the step left the polytope…
        layer.on_after_optimizer_step()
        _assert_doubly_stochastic(layer.W.detach(), atol=1e-5)  # …and the projection brought it back
        assert (layer.d.value >= layer.d.min_scale).all()


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_projection_guards_a_negative_row_and_column(projection):
    torch.manual_seed(1)
    W = torch.rand(5, 5)
    W[2] = -1.0
    W[:, 4] = -3.0
    X = SL.PROJECTIONS.get(projection)(W)
    _assert_doubly_stochastic(X, atol=1e-6)
    X = SL.PROJECTIONS.get(projection)(torch.full((5, 5), -1.0))
    torch.testing.assert_close(X, torch.full((5, 5), 0.2))


def test_sinkhorn_guard_resets_a_zero_row_to_uniform():
    M = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    guarded = SL._guard_zero_lines(M)
    torch.testing.assert_close(guarded[1], torch.full((3,), 1 / 3, dtype=torch.float64))
    _assert_doubly_stochastic(SL.sinkhorn_projection(M), atol=1e-12)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_projection_is_idempotent_and_deterministic(projection):
    project = SL.PROJECTIONS.get(projection)
    gen = torch.Generator().manual_seed(2)
    for n in (3, 8, 32):
        W = torch.randn(n, n, generator=gen) / n + 1 / n
        once = project(W)
        assert once.dtype == W.dtype
        assert torch.equal(project(W.clone()), once)  # bit-identical
        assert (project(once) - once).abs().max() < 1e-6


def test_round_to_birkhoff_is_exact_and_leaves_doubly_stochastic_matrices_alone():
    gen = torch.Generator().manual_seed(3)
    M = torch.rand(7, 7, generator=gen, dtype=torch.float64) * 0.3
    _assert_doubly_stochastic(SL.round_to_birkhoff(M), atol=1e-12)
    D = _random_doubly_stochastic(7, 4, gen)
    torch.testing.assert_close(SL.round_to_birkhoff(D), D, rtol=0, atol=1e-14)


def _brute_force_projection(Y: np.ndarray) -> np.ndarray:
    """argmin ½‖X − Y‖² over doubly stochastic X by SLSQP, to high accuracy."""
    n = Y.shape[0]
    constraints = [{"type": "eq", "fun": lambda x: x.reshape(n, n).sum(1) - 1},
                   {"type": "eq", "fun": lambda x: x.reshape(n, n).sum(0)[:-1] - 1}]
    result = minimize(lambda x: 0.5 * ((x - Y.ravel()) ** 2).sum(), np.full(n * n, 1 / n),
                      jac=lambda x: x - Y.ravel(), bounds=[(0, None)] * (n * n), constraints=constraints,
                      method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})
    assert result.success
    return result.x.reshape(n, n)


def _assert_kkt(X: torch.Tensor, Y: torch.Tensor, atol: float) -> None:
    """Optimality certificate: Y − X = α1ᵀ + 1βᵀ − Λ with Λ ≥ 0 and Λ ⊙ X = 0, i.e. some α, β have
    α_i + β_j = Y_ij − X_ij where X_ij > 0 and α_i + β_j ≥ Y_ij where X_ij = 0 (found by a feasibility LP,
    since α, β are not unique when the support is disconnected)."""
    n = X.shape[0]
    R, support = (Y - X).numpy(), (X > 1e-9).numpy()
    rows, rhs = [], []
    for i, j in itertools.product(range(n), range(n)):
        a = np.zeros(2 * n)
        a[i] = a[n + j] = 1  # α_i + β_j
        if support[i, j]:  # |α_i + β_j − R_ij| ≤ atol
            rows += [a, -a]
            rhs += [R[i, j] + atol, atol - R[i, j]]
        else:  # α_i + β_j ≥ Y_ij − atol
            rows.append(-a)
            rhs.append(atol - Y[i, j].item())
    result = linprog(np.zeros(2 * n), A_ub=np.array(rows), b_ub=np.array(rhs), bounds=[(None, None)] * (2 * n))
    assert result.status == 0, result.message


@pytest.mark.parametrize("n", [3, 4])
def test_euclidean_projection_matches_brute_force_and_kkt(n):
    gen = torch.Generator().manual_seed(n)
    for _ in range(5):
        Y = torch.randn(n, n, generator=gen, dtype=torch.float64)
        X = SL.euclidean_projection(Y)
        _assert_doubly_stochastic(X, atol=1e-9)
        _assert_kkt(X, Y, atol=1e-7)
        np.testing.assert_allclose(X.numpy(), _brute_force_projection(Y.numpy()), rtol=0, atol=1e-5)


def test_euclidean_projection_leaves_the_polytope_unchanged():
    gen = torch.Generator().manual_seed(5)
    for n in (3, 4, 9):
        D = _random_doubly_stochastic(n, 3, gen)
        torch.testing.assert_close(SL.euclidean_projection(D), D, rtol=0, atol=1e-12)
        P = torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
        torch.testing.assert_close(SL.euclidean_projection(P), P, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Hardening


def test_harden_picks_the_permutation_maximising_the_inner_product():
    gen = torch.Generator().manual_seed(6)
    for _ in range(5):
        layer = SL.build_stitch_layer("birkhoff", 4)
        with torch.no_grad():
            layer.W.copy_(SL.sinkhorn_projection(torch.rand(4, 4, generator=gen)))
        W = layer.W.detach().clone()
        best = max(itertools.permutations(range(4)), key=lambda p: sum(W[i, p[i]].item() for i in range(4)))
        layer.harden()
        assert layer.permutation.tolist() == list(best)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", "sigmoid", "tanh", "rbf", "poly3"])
def test_hardened_birkhoff_is_a_group_element(activation):
    torch.manual_seed(7)
    layer = SL.build_stitch_layer("birkhoff", C, activation=activation)
    group = S.intertwiner_group(activation)
    if isinstance(layer.d.value, torch.nn.Parameter):  # permutations have no scales to set
        with torch.no_grad():
            layer.d.value.copy_(torch.tensor([0.5, -0.7, 2.0, 0.1, -0.2, 1.5]))
    layer.on_after_optimizer_step()
    layer.harden()
    T = layer.matrix().detach()
    assert S.is_monomial(T)
    assert ((T != 0).sum(0) == 1).all() and ((T != 0).sum(1) == 1).all()
    assert torch.equal(T, S.compose(layer.permutation, layer.scales))
    assert group.contains(T)
    assert torch.equal(layer.eval().matrix().detach(), T)  # eval mode: the same P·D


def test_harden_freezes_w_trains_scales_and_is_idempotent():
    torch.manual_seed(8)
    layer = SL.build_stitch_layer("birkhoff", C)
    layer.harden()
    T, P = layer.matrix().detach().clone(), layer.P.clone()
    assert not layer.W.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["bias", "d.value"]
    with torch.no_grad():
        layer.W.copy_(torch.eye(C).flip(0))  # W no longer matters
    layer.harden()
    assert torch.equal(layer.P, P) and torch.equal(layer.matrix(), T)
    layer.matrix().sum().backward()
    assert layer.d.value.grad is not None and layer.W.grad is None
    assert layer.regularization().item() == 0


def test_signed_scales_harden_to_signs_and_stop_training():
    torch.manual_seed(9)
    layer = SL.build_stitch_layer("birkhoff", C, activation="tanh")
    with torch.no_grad():
        layer.d.value.copy_(torch.tensor([0.3, -0.2, 0.0, -1.0, 1.0, 0.9]))
    layer.harden()
    assert layer.scales.tolist() == [1.0, -1.0, 1.0, -1.0, 1.0, 1.0]
    assert not layer.d.value.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["bias"]


@pytest.mark.parametrize("name", ["birkhoff", "softsort", "lasso"])
def test_hardened_state_dict_loads_hardened(name):
    layer = _layer(name)
    layer.harden()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = _layer(name, seed=1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.hardened
    assert torch.equal(fresh.matrix(), layer.matrix())
    assert [p.requires_grad for p in fresh.parameters()] == [p.requires_grad for p in layer.parameters()]


def test_eval_mode_of_a_relaxed_birkhoff_layer_is_the_hungarian_p_d():
    layer = _layer("birkhoff")
    relaxed = layer.matrix().detach()
    torch.testing.assert_close(relaxed, layer.W.detach() * layer.d.value.detach())
    layer.eval()
    assert not layer.hardened
    assert torch.equal(layer.permutation, SL.hungarian(layer.W))
    assert torch.equal(layer.matrix().detach(), S.compose(layer.permutation, layer.scales))


def test_softsort_relaxation_and_its_hard_permutation():
    layer = _layer("softsort", tau=0.5)
    with torch.no_grad():
        layer.theta.copy_(torch.tensor([0.3, -1.0, 2.0, 0.31, 5.0, -4.0], dtype=torch.float64))
    P = layer.relaxed_permutation()
    sorted_theta = layer.theta.detach().sort().values
    for i, j in itertools.product(range(C), range(C)):
        logits = -(sorted_theta[i] - layer.theta.detach()).abs() / 0.5
        torch.testing.assert_close(P[i, j], torch.softmax(logits, 0)[j])
    assert layer.permutation.tolist() == [5, 1, 0, 3, 2, 4] == P.argmax(1).tolist()
    layer.harden()
    assert torch.equal(layer.matrix().detach(), S.compose(layer.permutation, layer.scales))
    assert S.intertwiner_group("relu").contains(layer.matrix().detach())
    assert not layer.theta.requires_grad


def test_softsort_ties_still_give_a_permutation():
    layer = _layer("softsort")
    with torch.no_grad():
        layer.theta.zero_()
    assert sorted(layer.permutation.tolist()) == list(range(C))


def test_lasso_harden_keeps_the_documented_sparsity():
    layer = _layer("lasso", threshold=2.5)
    with torch.no_grad():  # −1.25, −1, …, 7.5: exact in binary; |w| < 2.5 for 15 of the 36
        layer.weight.copy_((torch.arange(C * C, dtype=torch.float64).reshape(C, C) - 5) / 4)
    small = layer.weight.detach().abs() < 2.5
    assert int(small.sum()) == 15
    assert layer.describe()["sparsity"] == 15 / 36  # evaluated form, before harden
    layer.harden()
    assert layer.describe()["sparsity"] == 15 / 36
    assert (layer.weight.detach()[small] == 0).all()
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (layer(torch.randn(4, C, dtype=torch.float64)).pow(2).sum() + layer.regularization()).backward()
        opt.step()
    assert (layer.matrix().detach()[small] == 0).all()  # pruned weights stay pruned


def test_lowrank_matrix_has_rank_at_most_r():
    for rank in (None, 1, 3):
        layer = SL.build_stitch_layer("lowrank", 8, rank=rank)
        r = 2 if rank is None else rank
        assert layer.rank == r
        assert torch.linalg.matrix_rank(layer.matrix().detach()) <= r
        assert layer.describe()["rank"] == r


# ----------------------------------------------------------------------------------------------------------
# Exact ground truth: recovery


def test_least_squares_init_recovers_an_exact_affine_map():
    gen = torch.Generator().manual_seed(10)
    A, b = torch.randn(C, C, generator=gen), torch.randn(C, generator=gen)
    h = torch.randn(20, C, 3, 3, generator=gen)
    y = torch.einsum("oc,nchw->nohw", A, h) + b[None, :, None, None]
    layer = SL.build_stitch_layer("standard", C).init_least_squares(h, y)
    torch.testing.assert_close(layer.weight.detach(), A, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.bias.detach(), b, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer(h), y, rtol=0, atol=1e-5)
    linear = SL.build_stitch_layer("standard", C, bias=False)
    linear.init_least_squares(_tokens(h), _tokens(y - b[:, None, None]))  # tokens, no bias column
    torch.testing.assert_close(linear.weight.detach(), A, rtol=0, atol=1e-5)


def _train(layer: SL.StitchLayer, h: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    """Adam on MSE + regularization, projection after every step (skipped when nothing trains)."""
    params = [p for p in layer.parameters() if p.requires_grad]
    if not params:
        return
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (F.mse_loss(layer(h), y) + layer.regularization()).backward()
        opt.step()
        layer.on_after_optimizer_step()


def _recover(name: str, activation: str, g: torch.Tensor, h: torch.Tensor, seed: int) -> SL.MonomialStitch:
    torch.manual_seed(seed)
    layer = SL.build_stitch_layer(name, g.shape[0], activation=activation, bias=False)
    y = S.act_on_features(g, h)
    _train(layer, h, y, steps=300, lr=0.05)
    layer.harden()
    _train(layer, h, y, steps=100, lr=0.01)
    return layer


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("n", [6, 8])
def test_birkhoff_recovers_a_random_group_element(activation, n):
    gen = torch.Generator().manual_seed(n)
    g = S.intertwiner_group(activation).sample(n, gen).float()
    h = S.activation_fn(activation)(torch.randn(32, n, 4, 4, generator=gen))
    layer = _recover("birkhoff", activation, g, h, seed=n)
    perm, d = S.decompose(g)
    assert torch.equal(layer.permutation, perm)
    torch.testing.assert_close(layer.scales, d, rtol=1e-2, atol=0)
    assert S.intertwiner_group(activation).contains(layer.matrix().detach())


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_softsort_recovers_a_nearby_group_element(activation):
    """SoftSort's gradients are local: it reliably undoes swaps of neighbours in its initial order (here:
    channels 0↔1, 4↔5 of 8), not an arbitrary permutation (about 3 random ones in 10 at C = 6..8)."""
    n = 8
    gen = torch.Generator().manual_seed(11)
    perm = torch.tensor([1, 0, 2, 3, 5, 4, 6, 7])
    g = S.compose(perm, S.intertwiner_group(activation).sample_scales(n, gen)).float()
    h = S.activation_fn(activation)(torch.randn(32, n, 4, 4, generator=gen))
    layer = _recover("softsort", activation, g, h, seed=11)
    assert torch.equal(layer.permutation, perm)
    torch.testing.assert_close(layer.scales, S.decompose(g)[1], rtol=1e-2, atol=0)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_channel_match_finds_g_and_the_data_start_is_g(activation):
    """Y = g·X: the matching is g's permutation and its least-squares scales are g's, for g's π and for any
    other π the same rule; the birkhoff data start hardens to g itself."""
    n = 8
    gen = torch.Generator().manual_seed(3)
    g = S.intertwiner_group(activation).sample(n, gen)
    x = S.activation_fn(activation)(torch.randn(64, n, 4, 4, generator=gen, dtype=torch.float64))
    match = SL.ChannelMatch.of(x, S.act_on_features(g, x), n)
    perm, d = S.decompose(g)
    assert torch.equal(match.permutation(signed=activation == "tanh"), perm)
    torch.testing.assert_close(match.scales(perm), d, rtol=1e-12, atol=1e-12)
    other = perm.roll(1)  # target i ← source π'(i): its scales are the per-pair least squares
    xx, yy = x.movedim(1, -1).reshape(-1, n), S.act_on_features(g, x).movedim(1, -1).reshape(-1, n)
    want = torch.empty(n, dtype=torch.float64)
    want[other] = (yy * xx[:, other]).sum(0) / (xx[:, other] ** 2).sum(0)
    torch.testing.assert_close(match.scales(other), want)
    layer = SL.build_stitch_layer("birkhoff", n, activation=activation).double().init_from_data(x, S.act_on_features(g, x))
    layer.harden()
    torch.testing.assert_close(layer.matrix().detach(), g, rtol=1e-9, atol=1e-12)
    fixed = layer.fixed(other, match.scales(other))
    assert torch.equal(fixed.permutation, other) and fixed.hardened and not fixed.training
    assert torch.equal(layer.permutation, perm)  # a copy: the layer itself is unchanged


def test_layer_spec_names_a_layer_with_options():
    from symstitch.stitching.grammar import LayerSpec

    spec = LayerSpec.parse("lowrank:rank=4")
    assert (spec.label, spec.name, spec.options, spec.slug) == ("lowrank:rank=4", "lowrank", {"rank": 4},
                                                                  "lowrank_rank_4")
    assert LayerSpec.parse("lasso:lam=0.01;threshold=1e-3").options == {"lam": 0.01, "threshold": 1e-3}
    assert LayerSpec.parse("birkhoff") == LayerSpec("birkhoff", "birkhoff", {})
    with pytest.raises(KeyError, match="unknown stitch layer 'lowrnk'"):
        LayerSpec.parse("lowrnk:rank=4")
    with pytest.raises(ValueError, match="key=value"):
        LayerSpec.parse("lowrank:4")


def test_lowrank_data_start_is_the_reduced_rank_regression():
    """B = M·A with rank M = 2: the rank-2 layer's data start is M exactly; a rank-1 layer gets the best rank-1
    fit, which no other rank-1 map beats in least squares (checked against the truncated full fit)."""
    g = torch.Generator().manual_seed(0)
    C = 6
    M = torch.randn(C, 2, generator=g, dtype=torch.float64) @ torch.randn(2, C, generator=g, dtype=torch.float64)
    h_a = torch.randn(50, C, 3, 3, generator=g, dtype=torch.float64)
    h_b = torch.einsum("ij,njhw->nihw", M, h_a)
    two = SL.LowRankStitch(C, rank=2, bias=False).init_from_data(h_a.float(), h_b.float())
    torch.testing.assert_close(two.matrix().detach().double(), M, atol=1e-4, rtol=1e-4)
    one = SL.LowRankStitch(C, rank=1, bias=False).init_from_data(h_a.float(), h_b.float())
    A = h_a.permute(0, 2, 3, 1).reshape(-1, C)
    B = h_b.permute(0, 2, 3, 1).reshape(-1, C)
    ours = (A @ one.matrix().detach().double().T - B).norm()
    U, S, Vh = torch.linalg.svd(M)
    naive = (A @ (S[0] * torch.outer(U[:, 0], Vh[0])).T - B).norm()  # truncating M itself
    assert ours <= naive + 1e-6
    assert int(torch.linalg.matrix_rank(one.matrix().detach())) == 1
