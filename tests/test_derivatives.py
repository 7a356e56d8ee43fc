"""Per-sample gradients and norms, parameter Jacobians, NTK, GGN and Hessian operators."""

import numpy as np
import pytest
from scipy.sparse.linalg import LinearOperator, cg, eigsh

import jacobprop as jp
from jacobprop.flat import FlatParams

SMOOTH = ["Tanh", "Sigmoid", "Softplus"]


def build(seed, activation="Tanh", widths=(4, 6, 5, 3), dtype=np.float64, nested=False,
          tail=None):
    rng = np.random.default_rng(seed)
    layers = []
    for index, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(jp.Dense(n_in, n_out, rng=rng, dtype=dtype))
        if index < len(widths) - 2:
            layers.append(jp.LAYERS[activation]())
    if nested:
        # A nested stack: keys "1.0.W", ...; the walk must flatten it in order.
        layers = [layers[0], jp.Sequential(*layers[1:3]), *layers[3:]]
    if tail is not None:
        layers.append(tail)
    return jp.Sequential(*layers), rng


def loss_and_target(name, rng, shape, reduction="mean"):
    loss = jp.LOSSES[name](reduction=reduction)
    return loss, loss.example_target(shape, rng=rng)


def flat_of(net):
    flat = FlatParams(net.params)
    return flat, flat.flatten(net.params)


def at(net, flat, theta, fn):
    """`fn()` with the network's parameters set to `theta`, restored afterwards."""
    saved = flat.flatten(net.params)
    flat.assign(net.params, theta)
    try:
        return fn()
    finally:
        flat.assign(net.params, saved)


def flat_grad(net, x, t, loss, flat, theta):
    return at(net, flat, theta, lambda: flat.flatten(net.value_and_grad(x, t, loss)[1]))


def materialize(op: LinearOperator) -> np.ndarray:
    return np.stack([op @ e for e in np.eye(op.shape[1])], axis=1)


# ---- per-sample gradients -------------------------------------------------------------
@pytest.mark.parametrize("loss_name", ["SoftmaxCrossEntropy", "MSE", "BinaryCrossEntropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("nested", [False, True])
def test_per_sample_gradients_sum_to_the_batch_gradient_and_equal_a_loop(
        loss_name, reduction, nested):
    net, rng = build(len(loss_name) + 10 * nested, activation="ReLU", nested=nested)
    x = rng.standard_normal((6, 4))
    loss, t = loss_and_target(loss_name, rng, (6, 3), reduction)
    value, per_sample = net.value_and_grad(x, t, loss, per_sample=True)
    batch_value, batch = net.value_and_grad(x, t, loss)
    assert value == pytest.approx(batch_value)
    assert list(per_sample) == list(net.params)
    weight = 1 / 6 if reduction == "mean" else 1.0
    single = jp.LOSSES[loss_name](reduction="sum")
    for key, grads in per_sample.items():
        assert grads.shape == (6, *net.params[key].shape)
        np.testing.assert_allclose(grads.sum(axis=0), batch[key], rtol=1e-12, atol=1e-15)
    for i in range(6):
        _, alone = net.value_and_grad(x[i:i + 1], t[i:i + 1], single)
        for key in per_sample:
            np.testing.assert_allclose(per_sample[key][i], weight * alone[key], rtol=1e-12,
                                       atol=1e-15)


@pytest.mark.parametrize("activation", ["ReLU", "Tanh", "Softmax"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_per_sample_norms_equal_the_norms_of_the_materialized_gradients(activation, dtype):
    net, rng = build(3, activation=activation, dtype=dtype, nested=True)
    x = (rng.standard_normal((7, 4)) * 3).astype(dtype)
    loss, t = loss_and_target("SoftmaxCrossEntropy", rng, (7, 3))
    _, grads = net.value_and_grad(x, t, loss, per_sample=True)
    want = np.sqrt(sum(np.sum(g.reshape(7, -1).astype(np.float64) ** 2, axis=1)
                       for g in grads.values()))
    norms = net.per_sample_grad_norms(x, t, loss)
    assert norms.shape == (7,) and norms.dtype == dtype
    np.testing.assert_allclose(norms, want, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_per_sample_on_batch_of_one_is_the_gradient():
    net, rng = build(4)
    x = rng.standard_normal((1, 4))
    loss, t = loss_and_target("MSE", rng, (1, 3))
    _, per_sample = net.value_and_grad(x, t, loss, per_sample=True)
    _, batch = net.value_and_grad(x, t, loss)
    for key in batch:
        np.testing.assert_allclose(per_sample[key][0], batch[key], rtol=1e-13)
    np.testing.assert_allclose(net.per_sample_grad_norms(x, t, loss),
                               [np.sqrt(sum(np.sum(g**2) for g in batch.values()))])


def test_per_sample_refuses_what_it_cannot_do():
    net, rng = build(5)
    x = rng.standard_normal((3, 4))
    t = rng.standard_normal((3, 3))
    with pytest.raises(ValueError, match="RMSE is not a sum of per-sample losses"):
        net.value_and_grad(x, t, jp.RMSE(), per_sample=True)
    with pytest.raises(ValueError, match="RMSE is not a sum of per-sample losses"):
        net.per_sample_grad_norms(x, t, jp.RMSE())
    with pytest.raises(ValueError, match="per_sample=True works with mode='vjp'"):
        net.value_and_grad(x, t, jp.MSE(), mode="jacobian", per_sample=True)
    with pytest.raises(TypeError, match="`loss` must be a jacobprop Loss"):
        net.per_sample_grad_norms(x, t, "mse")


class CouplingLayer(jp.Identity):
    """Test-only: claims its samples interact (as BatchNorm in train mode does)."""

    @property
    def couples_samples(self):
        return True


@pytest.mark.parametrize("where", ["nested", "residual"])
def test_every_per_sample_path_refuses_a_network_whose_samples_interact(where):
    rng = np.random.default_rng(6 if where == "nested" else 170)
    if where == "nested":
        inner = jp.Sequential(jp.Dense(4, 5, rng=rng), CouplingLayer())
        net = jp.Sequential(jp.Dense(3, 4, rng=rng), inner, jp.Dense(5, 2, rng=rng))
        match = r"layer 1\.1 \(CouplingLayer\(\)\) couples samples"
    else:
        net = jp.Sequential(jp.Dense(3, 4, rng=rng), jp.Residual(jp.BatchNorm(4)),
                            jp.Dense(4, 2, rng=rng))
        match = r"layer 1 \(Residual\(BatchNorm.*couples samples"
    x, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    with pytest.raises(ValueError, match=match):
        net.value_and_grad(x, t, jp.MSE(), per_sample=True)
    with pytest.raises(ValueError, match=match):
        net.per_sample_grad_norms(x, t, jp.MSE())
    with pytest.raises(ValueError, match=match):
        net.param_jacobian(x)
    with pytest.raises(ValueError, match=match):
        jp.ntk(net, x)
    if where == "residual":
        net.eval()  # eval mode is per-sample again
        assert net.per_sample_grad_norms(x, t, jp.MSE()).shape == (4,)


# ---- parameter Jacobian and NTK ---------------------------------------------------------
def numeric_param_jacobian(net, x):
    flat, theta = flat_of(net)
    columns = []
    for j in range(flat.size):
        step = 1e-6 * max(1.0, abs(theta[j]))
        e = np.zeros(flat.size)
        e[j] = step
        plus = at(net, flat, theta + e, lambda: net(x))
        minus = at(net, flat, theta - e, lambda: net(x))
        columns.append((plus - minus) / (2 * step))
    return np.stack(columns, axis=2)


@pytest.mark.parametrize("activation", SMOOTH + ["Softmax"])
def test_param_jacobian_against_finite_differences(activation):
    net, rng = build(7, activation=activation, nested=True, tail=jp.Softmax())
    x = rng.standard_normal((3, 4))
    op = net.param_jacobian(x)
    flat, _ = flat_of(net)
    assert op.shape == (3, 3, flat.size)
    dense = op.to_dense()
    np.testing.assert_allclose(dense, numeric_param_jacobian(net, x), rtol=1e-6, atol=1e-9)
    # vjp, jvp and the sum over samples agree with the dense blocks.
    g = rng.standard_normal((3, 3))
    v = rng.standard_normal((3, flat.size))
    np.testing.assert_allclose(op.vjp(g), np.einsum("bm,bmp->bp", g, dense), rtol=1e-12)
    np.testing.assert_allclose(op.jvp(v), np.einsum("bmp,bp->bm", dense, v), rtol=1e-12)
    np.testing.assert_allclose(op.sum_vjp(g), np.einsum("bm,bmp->p", g, dense), rtol=1e-12)
    np.testing.assert_allclose(op.T.to_dense(), dense.swapaxes(1, 2))
    np.testing.assert_allclose(op[1].to_dense(), dense[1:2])


def test_param_jacobian_vjp_is_the_per_sample_gradient():
    net, rng = build(8, activation="ReLU")
    x = rng.standard_normal((5, 4))
    loss, t = loss_and_target("SoftmaxCrossEntropy", rng, (5, 3))
    g = loss.grad(net(x), t)
    _, per_sample = net.value_and_grad(x, t, loss, per_sample=True)
    flat_rows = np.concatenate([v.reshape(5, -1) for v in per_sample.values()], axis=1)
    np.testing.assert_allclose(net.param_jacobian(x).vjp(g), flat_rows, rtol=1e-12)


@pytest.mark.parametrize("activation", ["ReLU", "Tanh", "Softmax"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ntk_equals_the_explicit_product_of_parameter_jacobians(activation, dtype):
    net, rng = build(9, activation=activation, widths=(3, 7, 6, 4), dtype=dtype, nested=True)
    x1 = rng.standard_normal((5, 3)).astype(dtype)
    x2 = rng.standard_normal((2, 3)).astype(dtype)
    j1 = net.param_jacobian(x1).to_dense().astype(np.float64)
    j2 = net.param_jacobian(x2).to_dense().astype(np.float64)
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    same = jp.ntk(net, x1)
    assert same.shape == (5, 5, 4, 4) and same.dtype == dtype
    np.testing.assert_allclose(same, np.einsum("aip,bjp->abij", j1, j1), rtol=rtol, atol=rtol)
    cross = jp.ntk(net, x1, x2)
    np.testing.assert_allclose(cross, np.einsum("aip,bjp->abij", j1, j2), rtol=rtol,
                               atol=rtol)
    traced = jp.ntk(net, x1, x2, trace=True)
    assert traced.shape == (5, 2)
    np.testing.assert_allclose(traced, np.einsum("aip,bip->ab", j1, j2), rtol=rtol, atol=rtol)
    # The kernel of x with itself is symmetric positive semi-definite.
    matrix = same.transpose(0, 2, 1, 3).reshape(20, 20).astype(np.float64)
    np.testing.assert_allclose(matrix, matrix.T, rtol=rtol, atol=rtol)
    assert np.linalg.eigvalsh(matrix).min() > -1e-3 * np.abs(matrix).max()


def test_ntk_of_a_linear_output_and_a_lone_dense_layer():
    rng = np.random.default_rng(10)
    net = jp.Sequential(jp.Dense(3, 2, rng=rng))
    x = rng.standard_normal((4, 3))
    # y = W x + b: J_a J_b^T = (<x_a, x_b> + 1) I.
    want = (x @ x.T + 1)[:, :, None, None] * np.eye(2)
    np.testing.assert_allclose(jp.ntk(net, x), want, rtol=1e-13)
    with pytest.raises(TypeError, match="`net` must be a jacobprop Sequential"):
        jp.ntk(jp.Dense(3, 2, rng=rng), x)
    with pytest.raises(jp.ShapeError, match="ntk `x2`"):
        jp.ntk(net, x, np.zeros((2, 5)))


# ---- curvature --------------------------------------------------------------------------
def loss_hessian_blocks(loss, y, t):
    """d^2 L/dy^2 `(B m, B m)` by central differences of the loss gradient."""
    size = y.size
    columns = []
    for j in range(size):
        e = np.zeros(size)
        e[j] = 1e-6
        plus = loss.grad(y + e.reshape(y.shape), t)
        minus = loss.grad(y - e.reshape(y.shape), t)
        columns.append(((plus - minus) / 2e-6).reshape(-1))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("name", sorted(jp.LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_loss_states_its_hessian(name, reduction):
    rng = np.random.default_rng(len(name) + (reduction == "sum"))
    y = rng.standard_normal((4, 3))
    loss, t = loss_and_target(name, rng, (4, 3), reduction)
    if name == "SoftmaxCrossEntropy" and reduction == "sum":
        t = rng.dirichlet(np.ones(3), size=4)  # probability rows too
    v = rng.standard_normal((4, 3))
    want = (loss_hessian_blocks(loss, y, t) @ v.reshape(-1)).reshape(4, 3)
    got = loss._hessian_product(y, t, v)  # every registered loss states it
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss_name", sorted(jp.LOSSES))
@pytest.mark.parametrize("activation", ["ReLU", "Tanh"])
def test_ggn_equals_the_explicit_product_and_is_symmetric_psd(loss_name, activation):
    net, rng = build(11 + len(loss_name), activation=activation, nested=True,
                     tail=jp.Softmax() if loss_name == "MSE" else None)
    x = rng.standard_normal((5, 4))
    loss, t = loss_and_target(loss_name, rng, (5, 3))
    y = net(x)
    jac = net.param_jacobian(x).to_dense()
    blocks = loss_hessian_blocks(loss, y, t)
    flat_jac = jac.reshape(15, -1)
    want = flat_jac.T @ blocks @ flat_jac
    operator = jp.ggn(net, x, t, loss)
    assert isinstance(operator, LinearOperator)
    got = materialize(operator)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8 * np.abs(want).max())
    np.testing.assert_allclose(got, got.T, rtol=1e-12, atol=1e-15)
    assert np.linalg.eigvalsh(got).min() > -1e-10 * np.abs(got).max()


@pytest.mark.parametrize("activation", ["Tanh", "Sigmoid", "Softplus", "LeakyReLU", "Identity",
                                        "Softmax"])
@pytest.mark.parametrize("loss_name", sorted(jp.LOSSES))
def test_hessian_against_finite_differences_of_the_gradient(activation, loss_name):
    net, rng = build(20 + len(activation) + len(loss_name), activation=activation,
                     nested=True)
    x = rng.standard_normal((4, 4))
    loss, t = loss_and_target(loss_name, rng, (4, 3))
    flat, theta = flat_of(net)
    got = materialize(jp.hessian(net, x, t, loss))
    step = 1e-5
    want = np.stack([
        (flat_grad(net, x, t, loss, flat, theta + step * e)
         - flat_grad(net, x, t, loss, flat, theta - step * e)) / (2 * step)
        for e in np.eye(flat.size)
    ], axis=1)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=1e-6 * scale)
    np.testing.assert_allclose(got, got.T, atol=1e-12 * scale)


def test_hessian_of_relu_network_is_ggn_plus_dense_cross_terms():
    # ReLU is piecewise linear, so the only second-order terms are the Dense
    # ones (the vjp is bilinear in weights and covectors); the FD test above
    # covers them with LeakyReLU; here the ReLU network against its gradient.
    net, rng = build(30, activation="ReLU")
    x = rng.standard_normal((6, 4)) * 2
    loss, t = loss_and_target("SoftmaxCrossEntropy", rng, (6, 3))
    flat, theta = flat_of(net)
    v = rng.standard_normal(flat.size)
    step = 1e-6
    want = (flat_grad(net, x, t, loss, flat, theta + step * v)
            - flat_grad(net, x, t, loss, flat, theta - step * v)) / (2 * step)
    np.testing.assert_allclose(jp.hessian(net, x, t, loss) @ v, want, rtol=1e-6,
                               atol=1e-8 * np.abs(want).max())


def test_curvature_operators_work_with_scipy_and_never_touch_the_parameters():
    net, rng = build(31, activation="Tanh", widths=(3, 5, 2))
    x = rng.standard_normal((8, 3))
    loss, t = loss_and_target("SoftmaxCrossEntropy", rng, (8, 2))
    before = {key: value.copy() for key, value in net.params.items()}
    H = jp.hessian(net, x, t, loss)
    G = jp.ggn(net, x, t, loss)
    dense_h = materialize(H)
    top = eigsh(H, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(dense_h)[-2:], rtol=1e-8)
    # A damped Newton system through cg.
    damped = LinearOperator(G.shape, matvec=lambda v: G @ v + 1e-2 * v, dtype=G.dtype)
    b = rng.standard_normal(G.shape[0])
    solution, info = cg(damped, b, rtol=1e-10, maxiter=500)
    assert info == 0
    np.testing.assert_allclose(materialize(G) @ solution + 1e-2 * solution, b, atol=1e-7)
    for key, value in net.params.items():
        np.testing.assert_array_equal(value, before[key])


def test_curvature_in_float32_follows_float64():
    net64, rng = build(32, activation="Tanh")
    net32, _ = build(32, activation="Tanh", dtype=np.float32)
    x = rng.standard_normal((5, 4))
    loss, t = loss_and_target("MSE", rng, (5, 3))
    v = rng.standard_normal(FlatParams(net64.params).size)
    for make in (jp.ggn, jp.hessian):
        op32 = make(net32, x.astype(np.float32), t.astype(np.float32), loss)
        assert op32.dtype == np.float32
        np.testing.assert_allclose(op32 @ v.astype(np.float32), make(net64, x, t, loss) @ v,
                                   rtol=2e-3, atol=2e-4)


class NoSecondDerivative(jp.Identity):
    """Test-only: an elementwise layer that does not state its second derivative."""

    def _second_vjp(self, cache, g, v, tangents, need_input=True):
        return jp.Layer._second_vjp(self, cache, g, v, tangents, need_input)


def test_hessian_names_a_layer_without_second_derivative_and_ggn_still_works():
    net, rng = build(33, tail=NoSecondDerivative())
    x = rng.standard_normal((3, 4))
    loss, t = loss_and_target("MSE", rng, (3, 3))
    v = np.ones(FlatParams(net.params).size)
    with pytest.raises(NotImplementedError, match="NoSecondDerivative does not state"):
        jp.hessian(net, x, t, loss) @ v
    assert np.isfinite(jp.ggn(net, x, t, loss) @ v).all()


@pytest.mark.parametrize("name", sorted(jp.LAYERS))
def test_every_layer_states_its_curvature_hooks_or_says_it_does_not(name):
    """`_param_jvp` and `_second_vjp` against differences of forward and vjp."""
    rng = np.random.default_rng(sum(map(ord, name)))
    layer = jp.LAYERS[name].example(4, rng=rng)
    # The hooks state the layer's maths; eval mode keeps a stochastic layer's
    # differences meaningful and a batch-coupled one per-sample.
    layer.training = False
    x = rng.standard_normal((3, 4))
    y, cache = layer.forward(x)
    g = rng.standard_normal(y.shape)
    v = rng.standard_normal(x.shape)
    tangents = {key: rng.standard_normal(p.shape) for key, p in layer.params.items()}
    step = 1e-6

    def moved(sign):
        saved = {key: p.copy() for key, p in layer.params.items()}
        for key, p in layer.params.items():
            p += sign * step * tangents[key]
        try:
            out, moved_cache = layer.forward(x + sign * step * v)
            return out, layer.vjp(moved_cache, g)
        finally:
            for key, p in layer.params.items():
                p[...] = saved[key]

    (y_plus, (gx_plus, gp_plus)), (y_minus, (gx_minus, gp_minus)) = moved(1), moved(-1)
    if layer.params:
        want = (y_plus - y_minus) / (2 * step) - layer.jvp(cache, v)
        np.testing.assert_allclose(layer._param_jvp(cache, tangents), want, rtol=1e-6,
                                   atol=1e-8)
    try:
        gx2, own = layer._second_vjp(cache, g, v, tangents)
    except NotImplementedError as error:
        assert name in str(error)
        return
    want_gx = (gx_plus - gx_minus) / (2 * step)
    np.testing.assert_allclose(np.zeros_like(x) if gx2 is None else gx2, want_gx, rtol=1e-5,
                               atol=1e-7)
    for key in layer.params:
        want_p = (gp_plus[key] - gp_minus[key]) / (2 * step)
        np.testing.assert_allclose(own.get(key, np.zeros_like(want_p)), want_p, rtol=1e-5,
                                   atol=1e-7)


@pytest.mark.parametrize("batch", [0, 1])
def test_ntk_and_param_jacobian_at_tiny_batches(batch):
    net, rng = build(40 + batch)
    x = rng.standard_normal((batch, 4))
    P = FlatParams(net.params).size
    dense = net.param_jacobian(x).to_dense()
    assert dense.shape == (batch, 3, P)
    np.testing.assert_allclose(jp.ntk(net, x), np.einsum("aip,bjp->abij", dense, dense),
                               atol=1e-13)
    assert jp.ntk(net, x, trace=True).shape == (batch, batch)


def test_curvature_and_norms_stay_finite_at_large_magnitudes():
    # Tanh and softmax saturate: second derivatives underflow to zero, never nan.
    net, rng = build(42, activation="Tanh", tail=jp.Softmax())
    x = rng.standard_normal((5, 4)) * 1e3
    loss, t = loss_and_target("MSE", rng, (5, 3))
    hess = materialize(jp.hessian(net, x, t, loss))
    assert np.isfinite(hess).all()
    np.testing.assert_allclose(hess, hess.T, atol=1e-12 * max(np.abs(hess).max(), 1e-300))
    norms = net.per_sample_grad_norms(x, t, loss)
    assert np.isfinite(norms).all() and (norms >= 0).all()
