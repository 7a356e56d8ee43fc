"""Optimizers: first steps against values computed by hand, validation before writing,
state kept apart and copied out and back, schedules, float32."""

import math

import numpy as np
import pytest

import jacobprop as jp


def one_param(value, dtype=np.float64):
    return {"w": np.array([value], dtype=dtype)}


def grads_of(*values, dtype=np.float64):
    return [{"w": np.array([v], dtype=dtype)} for v in values]


def run(optimizer, start, gradients):
    params = one_param(start)
    trajectory = []
    for grads in grads_of(*gradients):
        optimizer.step(params, grads)
        trajectory.append(params["w"][0])
    return trajectory


# ---- SGD -----------------------------------------------------------------------------------
def test_sgd_plain_steps():
    assert run(jp.SGD(0.1), 1.0, [2.0, -1.0]) == pytest.approx([0.8, 0.9], abs=1e-15)


def test_sgd_momentum_first_step_takes_the_gradient_then_accumulates():
    # b1 = g1 = 2 -> p = 1 - 0.1*2 = 0.8; b2 = 0.9*2 + 1 = 2.8 -> p = 0.8 - 0.28 = 0.52
    assert run(jp.SGD(0.1, momentum=0.9), 1.0, [2.0, 1.0]) == pytest.approx([0.8, 0.52])


def test_sgd_nesterov():
    # b1 = 2, step g + 0.9 b1 = 3.8 -> 1 - 0.38 = 0.62; b2 = 0.9*2 + 1 = 2.8,
    # step 1 + 0.9*2.8 = 3.52 -> 0.62 - 0.352 = 0.268
    got = run(jp.SGD(0.1, momentum=0.9, nesterov=True), 1.0, [2.0, 1.0])
    assert got == pytest.approx([0.62, 0.268])


def test_sgd_weight_decay_is_added_to_the_gradient():
    # g' = 2 + 0.5*1 = 2.5 -> 1 - 0.25 = 0.75; g' = 0 + 0.5*0.75 -> 0.75 - 0.0375
    assert run(jp.SGD(0.1, weight_decay=0.5), 1.0, [2.0, 0.0]) == pytest.approx([0.75, 0.7125])


# ---- Adam ----------------------------------------------------------------------------------
def adam_by_hand(start, gradients, lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.0,
                 decoupled=False):
    p, m, v, out = start, 0.0, 0.0, []
    for k, g in enumerate(gradients, start=1):
        if decoupled:
            p *= 1 - lr * wd
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**k), v / (1 - b2**k)
        p -= lr * m_hat / (math.sqrt(v_hat) + eps)
        out.append(p)
    return out


def test_adam_first_step_moves_by_lr_times_the_sign():
    assert run(jp.Adam(0.01), 1.0, [3.0]) == pytest.approx([0.99], abs=1e-10)
    assert run(jp.Adam(0.01), 1.0, [-1e-3]) == pytest.approx([1.01], abs=1e-7)


@pytest.mark.parametrize("wd, decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_adam_three_steps_by_hand(wd, decoupled):
    gradients = [0.5, -2.0, 1.5]
    got = run(jp.Adam(0.01, weight_decay=wd, decoupled=decoupled), 1.0, gradients)
    assert got == pytest.approx(adam_by_hand(1.0, gradients, wd=wd, decoupled=decoupled),
                                rel=1e-13)


def test_adamw_decay_differs_from_coupled_decay():
    coupled = run(jp.Adam(0.1, weight_decay=0.5), 2.0, [1.0, 1.0])
    decoupled = run(jp.Adam(0.1, weight_decay=0.5, decoupled=True), 2.0, [1.0, 1.0])
    assert coupled != pytest.approx(decoupled)


# ---- shared behaviour ------------------------------------------------------------------------
OPTIMIZERS = [
    lambda: jp.SGD(0.1),
    lambda: jp.SGD(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda: jp.Adam(0.01),
    lambda: jp.Adam(0.01, weight_decay=0.1, decoupled=True),
]


def params_and_grads(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = {"0.W": rng.standard_normal((3, 2)).astype(dtype),
              "0.b": rng.standard_normal(3).astype(dtype)}
    grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
    return params, grads


@pytest.mark.parametrize("index", range(len(OPTIMIZERS)))
@pytest.mark.parametrize("bad", ["missing", "extra", "shape", "integer"])
def test_mismatched_grads_raise_before_anything_is_written(index, bad):
    optimizer = OPTIMIZERS[index]()
    params, grads = params_and_grads(index)
    optimizer.step(params, grads)  # state exists: it must not move either
    before, state = {k: v.copy() for k, v in params.items()}, optimizer.state_dict()
    if bad == "missing":
        del grads["0.b"]
    elif bad == "extra":
        grads["1.W"] = grads["0.W"]
    elif bad == "shape":
        grads["0.b"] = np.zeros(4)
    else:
        grads["0.b"] = np.zeros(3, dtype=int)
    with pytest.raises((KeyError, ValueError, TypeError), match="0.b|1.W"):
        optimizer.step(params, grads)
    for key in params:
        assert np.array_equal(params[key], before[key])
    after = optimizer.state_dict()
    assert after["steps"] == state["steps"] == 1
    for key, named in state["state"].items():
        for name, value in named.items():
            assert np.array_equal(after["state"][key][name], value)


@pytest.mark.parametrize("index", range(len(OPTIMIZERS)))
def test_updates_in_place_and_never_touch_the_gradients(index):
    optimizer = OPTIMIZERS[index]()
    params, grads = params_and_grads(10 + index)
    live, given = dict(params), {k: v.copy() for k, v in grads.items()}
    optimizer.step(params, grads)
    assert all(params[k] is live[k] for k in params)
    assert all(np.array_equal(grads[k], given[k]) for k in grads)


@pytest.mark.parametrize("index", range(len(OPTIMIZERS)))
def test_state_dict_round_trip_resumes_identically(index):
    params, grads = params_and_grads(20 + index)
    first = OPTIMIZERS[index]()
    for _ in range(3):
        first.step(params, grads)
    copy = {k: v.copy() for k, v in params.items()}
    second = OPTIMIZERS[index]()
    second.load_state_dict(first.state_dict())
    first.step(params, grads)
    second.step(copy, grads)
    assert all(np.array_equal(params[k], copy[k]) for k in params)


@pytest.mark.parametrize("index", range(len(OPTIMIZERS)))
def test_float32_stays_float32(index):
    optimizer = OPTIMIZERS[index]()
    params, grads = params_and_grads(30 + index, dtype=np.float32)
    optimizer.step(params, grads)
    assert all(v.dtype == np.float32 for v in params.values())
    assert all(a.dtype == np.float32 for s in optimizer.state.values() for a in s.values())


def test_schedule_is_called_with_the_step_index():
    seen = []

    def schedule(step):
        seen.append(step)
        return 0.1 / (1 + step)

    got = run(jp.SGD(schedule), 1.0, [1.0, 1.0, 1.0])
    assert seen == [0, 1, 2]
    assert got == pytest.approx([0.9, 0.85, 0.85 - 0.1 / 3])


@pytest.mark.parametrize("returned", [float("nan"), -0.1, True, "0.1"])
def test_schedule_returning_garbage_is_an_error(returned):
    params = one_param(1.0)
    with pytest.raises(ValueError, match=r"schedule `lr` returned .* at step 0"):
        jp.Adam(lambda step: returned).step(params, {"w": np.ones(1)})
    assert params["w"][0] == 1.0


def test_the_layout_is_fixed_by_the_first_step_not_by_a_check():
    optimizer = jp.SGD(0.1, momentum=0.5)
    params, grads = params_and_grads(41)
    optimizer._check(params, grads)  # what fit does before its first step
    other = {"w": np.zeros(2)}
    optimizer.step(other, {"w": np.ones(2)})
    optimizer.step(other, {"w": np.ones(2)})
    assert other["w"] == pytest.approx([-0.25, -0.25])


def test_a_different_layout_needs_a_new_optimizer():
    optimizer = jp.Adam()
    params, grads = params_and_grads(40)
    optimizer.step(params, grads)
    with pytest.raises(ValueError, match="new optimizer"):
        optimizer.step({"w": np.zeros(2)}, {"w": np.ones(2)})


@pytest.mark.parametrize("make, match", [
    (lambda: jp.SGD(-1.0), "lr"),
    (lambda: jp.SGD(0.1, momentum=-0.5), "momentum"),
    (lambda: jp.SGD(0.1, nesterov=True), "nesterov"),
    (lambda: jp.Adam(betas=(0.9, 1.0)), "betas"),
    (lambda: jp.Adam(eps=float("inf")), "eps"),
    (lambda: jp.Adam(weight_decay=True), "weight_decay"),
])
def test_bad_settings_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()
