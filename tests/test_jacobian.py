"""The structured Jacobian operators: exact dense values, structure kept by `@`, views."""

import numpy as np
import pytest
import scipy.sparse as sparse

import jacobprop as jp
from jacobprop.jacobian import chain_cost, multiply_chain

B, M, K, N = 3, 4, 5, 2


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def make(kind, rng, m=M, n=None, batch=B):
    """A random operator of `kind` with blocks (m, n) (square kinds ignore n)."""
    n = m if n is None else n
    if kind == "general":
        return jp.GeneralJacobian(rng.standard_normal((batch, m, n)))
    if kind == "shared":
        return jp.SharedJacobian(rng.standard_normal((m, n)), batch)
    if kind == "diagonal":
        return jp.DiagonalJacobian(rng.standard_normal((batch, m)))
    if kind == "identity":
        return jp.IdentityJacobian(batch, m)
    if kind == "softmax":
        s = rng.random((batch, m))
        return jp.SoftmaxJacobian(s / s.sum(axis=1, keepdims=True))
    if kind == "kronecker":
        # Blocks (m, p*q): choose p*q == n when possible, else p = n, q = 1.
        q = 2 if n % 2 == 0 else 1
        return jp.KroneckerJacobian(
            jp.GeneralJacobian(rng.standard_normal((batch, m, n // q))),
            rng.standard_normal((batch, q)),
        )
    raise AssertionError(kind)


KINDS = ["general", "shared", "diagonal", "identity", "softmax", "kronecker"]
SQUARE = {"diagonal", "identity", "softmax"}


def test_dense_values_of_each_structure(rng):
    d = rng.standard_normal((B, M))
    expected = np.stack([np.diag(row) for row in d])
    np.testing.assert_array_equal(jp.DiagonalJacobian(d).to_dense(), expected)

    s = rng.random((B, M))
    s /= s.sum(axis=1, keepdims=True)
    expected = np.stack([np.diag(row) - np.outer(row, row) for row in s])
    np.testing.assert_allclose(jp.SoftmaxJacobian(s).to_dense(), expected, atol=1e-15)

    W = rng.standard_normal((M, N))
    np.testing.assert_array_equal(jp.SharedJacobian(W, B).to_dense(), np.stack([W] * B))
    np.testing.assert_array_equal(jp.IdentityJacobian(B, M).to_dense(), np.stack([np.eye(M)] * B))

    # Dense weight Jacobian: dy_i/dvec(W) = I_out kron x_i^T (C-order vec of W).
    x = rng.standard_normal((B, N))
    weight = jp.KroneckerJacobian(jp.IdentityJacobian(B, M), x)
    expected = np.stack([np.kron(np.eye(M), row[None, :]) for row in x])
    np.testing.assert_array_equal(weight.to_dense(), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_vjp_jvp_sums_and_transpose_match_dense(kind, rng):
    op = make(kind, rng, n=None if kind in SQUARE else 6)
    dense = op.to_dense()
    batch, m, n = op.shape
    assert dense.shape == op.shape
    g = rng.standard_normal((batch, m))
    v = rng.standard_normal((batch, n))
    np.testing.assert_allclose(op.vjp(g), np.einsum("bm,bmn->bn", g, dense), atol=1e-12)
    np.testing.assert_allclose(op.jvp(v), np.einsum("bmn,bn->bm", dense, v), atol=1e-12)
    np.testing.assert_allclose(op.sum_vjp(g), np.einsum("bm,bmn->n", g, dense), atol=1e-12)
    np.testing.assert_allclose(op.batch_sum(), dense.sum(axis=0), atol=1e-12)
    np.testing.assert_allclose(op.T.to_dense(), dense.swapaxes(1, 2), atol=1e-15)
    np.testing.assert_allclose(op.T.vjp(v), op.jvp(v), atol=1e-12)
    np.testing.assert_allclose(op[1].to_dense(), dense[1:2], atol=1e-15)
    np.testing.assert_allclose(op[[2, 0]].to_dense(), dense[[2, 0]], atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
def test_scipy_and_sparse_views(kind, rng):
    op = make(kind, rng, n=None if kind in SQUARE else 6)
    dense = op.to_dense()
    batch, m, n = op.shape
    block_diagonal = np.zeros((batch * m, batch * n))
    for i in range(batch):
        block_diagonal[i * m:(i + 1) * m, i * n:(i + 1) * n] = dense[i]
    sparse_matrix = op.to_sparse()
    assert sparse.issparse(sparse_matrix)
    np.testing.assert_allclose(sparse_matrix.toarray(), block_diagonal, atol=1e-15)
    linear = op.to_scipy()
    assert linear.shape == (batch * m, batch * n)
    v = rng.standard_normal(batch * n)
    u = rng.standard_normal(batch * m)
    np.testing.assert_allclose(linear.matvec(v), block_diagonal @ v, atol=1e-12)
    np.testing.assert_allclose(linear.rmatvec(u), block_diagonal.T @ u, atol=1e-12)
    one = op.to_scipy(sample=2)
    np.testing.assert_allclose(one.matvec(v[:n]), dense[2] @ v[:n], atol=1e-12)


def test_sparse_structures_store_only_their_nonzeros(rng):
    d = rng.standard_normal((B, M))
    assert jp.DiagonalJacobian(d).to_sparse().nnz == B * M
    assert jp.IdentityJacobian(B, M).to_sparse().nnz == B * M


@pytest.mark.parametrize("left", KINDS)
@pytest.mark.parametrize("right", KINDS)
def test_products_equal_dense_products(left, right, rng):
    a = make(left, rng, m=M, n=None if left in SQUARE else M)
    b = make(right, rng, m=M, n=None if right in SQUARE else 6)
    product = a @ b
    assert isinstance(product, jp.Jacobian)
    np.testing.assert_allclose(product.to_dense(), a.to_dense() @ b.to_dense(), atol=1e-12)


@pytest.mark.parametrize(
    ("left", "right", "kind"),
    [
        ("diagonal", "diagonal", jp.DiagonalJacobian),
        ("shared", "shared", jp.SharedJacobian),
        ("identity", "softmax", jp.SoftmaxJacobian),
        ("softmax", "identity", jp.SoftmaxJacobian),
        ("general", "kronecker", jp.KroneckerJacobian),
        ("diagonal", "kronecker", jp.KroneckerJacobian),
    ],
)
def test_products_keep_structure(left, right, kind, rng):
    a = make(left, rng)
    b = make(right, rng, n=None if right in SQUARE else 6)
    assert isinstance(a @ b, kind)


def test_shared_products_never_touch_the_batch(rng):
    a = jp.SharedJacobian(rng.standard_normal((M, K)), 10**9)  # B never allocated
    b = jp.SharedJacobian(rng.standard_normal((K, N)), 10**9)
    product = a @ b
    assert isinstance(product, jp.SharedJacobian)
    assert product.shape == (10**9, M, N)
    np.testing.assert_allclose(product.matrix, a.matrix @ b.matrix)


def test_diagonal_times_shared_scales_rows(rng):
    d = jp.DiagonalJacobian(rng.standard_normal((B, M)))
    W = jp.SharedJacobian(rng.standard_normal((M, N)), B)
    np.testing.assert_allclose(
        (d @ W).to_dense(), d.diagonal[:, :, None] * W.matrix[None], atol=1e-15
    )


def test_ndarray_on_either_side_of_matmul(rng):
    op = make("diagonal", rng)
    matrix = rng.standard_normal((K, M))
    stack = rng.standard_normal((B, K, M))
    np.testing.assert_allclose((matrix @ op).to_dense(), matrix @ op.to_dense(), atol=1e-12)
    np.testing.assert_allclose((stack @ op).to_dense(), stack @ op.to_dense(), atol=1e-12)
    np.testing.assert_allclose(
        (op @ matrix.T).to_dense(), op.to_dense() @ matrix.T, atol=1e-12
    )


def test_sum_and_scaling(rng):
    a, b = make("diagonal", rng), make("identity", rng)
    assert isinstance(a + b, jp.DiagonalJacobian)
    np.testing.assert_allclose((a + b).to_dense(), a.to_dense() + b.to_dense())
    c = make("general", rng)
    np.testing.assert_allclose((a + c).to_dense(), a.to_dense() + c.to_dense())
    np.testing.assert_allclose((-c).to_dense(), -c.to_dense())
    np.testing.assert_allclose((2.5 * a).to_dense(), 2.5 * a.to_dense())


@pytest.mark.parametrize("order", ["forward", "reverse", "auto"])
def test_chain_orders_agree(order, rng):
    ops = [
        make("shared", rng, m=3, n=M),
        make("diagonal", rng, m=M),
        make("shared", rng, m=M, n=6),
        make("softmax", rng, m=6),
        make("shared", rng, m=6, n=2),
    ]
    expected = ops[0].to_dense()
    for op in ops[1:]:
        expected = expected @ op.to_dense()
    np.testing.assert_allclose(multiply_chain(ops, order).to_dense(), expected, atol=1e-12)


def test_auto_order_is_never_costlier_and_follows_the_shapes(rng):
    # Wide input, narrow output: reverse accumulation is the cheap one.
    wide_in = [
        make("shared", rng, m=2, n=30),
        make("diagonal", rng, m=30),
        make("shared", rng, m=30, n=200),
    ]
    forward, _ = chain_cost(wide_in, "forward")
    reverse, _ = chain_cost(wide_in, "reverse")
    auto, _ = chain_cost(wide_in, "auto")
    assert reverse < forward
    assert auto <= reverse
    # Narrow input, wide output: forward accumulation is the cheap one.
    narrow_in = [op.T for op in wide_in[::-1]]
    assert chain_cost(narrow_in, "forward")[0] < chain_cost(narrow_in, "reverse")[0]


def test_bad_shapes_raise_shape_error(rng):
    op = make("general", rng, m=M, n=N)
    with pytest.raises(jp.ShapeError, match=r"GeneralJacobian.vjp: `g` must have shape"):
        op.vjp(np.zeros((B, M + 1)))
    with pytest.raises(jp.ShapeError, match=r"`v` must have shape .* got \(2, 2\)"):
        op.jvp(np.zeros((2, N)))
    with pytest.raises(jp.ShapeError, match="cannot compose"):
        op @ make("diagonal", rng, m=M)
    with pytest.raises(jp.ShapeError, match="cannot compose"):
        op @ make("diagonal", rng, m=N, batch=B + 1)
    with pytest.raises(ValueError, match="order"):
        multiply_chain([op], "sideways")
    with pytest.raises(IndexError, match="out of range"):
        op[B]
