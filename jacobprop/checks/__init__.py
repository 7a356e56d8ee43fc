"""Finite-difference checks of every derivative jacobprop computes.

    report = jp.gradcheck(net, x, t, loss)          # every parameter and x, per coordinate
    report = jp.gradcheck(net, x, t, loss, fast=True)   # a few random directions
    report = jp.check_layer(layer, x)               # one layer: Jacobians, vjp, jvp, dot test
    result = jp.taylor_test(net, x, t, loss)        # order of the Taylor remainder, 2 if right
    J = jp.numerical_jacobian(f, x)                 # (B, m, n) in 2n evaluations of f

How the checks stay honest
--------------------------
- Finite differences always run in float64, on a float64 *copy* of every
  layer: the live parameter arrays are only ever read, so a failing or raising
  check leaves them exactly as they were.
- Steps are scaled to the dtype and to each coordinate,
  `h_j = eps^(1/3) max(1, |p_j|)` for central differences (truncation `h^2`
  against rounding `eps/h`) and `eps^(1/5) max(1, |p_j|)` with Richardson
  extrapolation `(4 D(h/2) - D(h)) / 3`, which cancels the `h^2` term.
- Tolerances follow one policy, stated once in `tolerance.py` (finite
  differences against `rtol max(|terms|, |numeric|)` plus a floor and the
  rounding of one evaluation, `rtol = 1e5 eps^(2/3)`; analytic against
  analytic within `1e3 eps(dtype)` of the product's terms plus the rounding a
  structured product may leave). Nothing grows with the dimension.
- A network that computes in float32 is certified only against tolerances
  the caller chose for float32 (`rtol=`, optionally `atol=`); without them
  the checks raise TypeError rather than apply float64 tolerances.
- Layers and losses are called as a network calls them (`_call_*`, see
  `jacobprop.dispatch`): a public override is what gets checked. A stochastic
  layer in train mode is refused (ValueError: call `net.eval()`).

The package: `tolerance` (the policy, argument checks), `reports`
(`CheckEntry`, `GradcheckReport`, `TaylorReport`), `differences` (the float64
copy, batched perturbed passes, `numerical_jacobian`), `kinks` (the kink
rule), `hooks` (the layers' shortcut hooks against their forward passes),
`layercheck` (`check_layer`, `dottest`), `netcheck` (`gradcheck`),
`taylor` (`taylor_test`).

The kink rule
-------------
A layer declares in `kinks` the input values where its derivative jumps (ReLU,
LeakyReLU: `(0.0,)`), or, when its kinks are not input values, overrides the one
hook every checker reads, `Layer._kink_crossed(z, z0)` (MaxPool2D: a tie between
two entries of a window is a kink in their difference, and any slope between the
one-sided ones is accepted there, as for ReLU); a loss declares, the same way,
the values of the residual `y - t` where its derivative jumps (RMSE: `(0.0,)`,
where `L` is a norm at its minimum). Where the derivative jumps, any value between
the one-sided slopes is a correct derivative, and finite differences that
straddle the jump mean nothing. So an entry that fails the central-difference
test is *accepted at a kink* when, and only when,

1. a kink is within reach of its perturbation: while the perturbed points
   `p +- h e_j` are pushed through the network, some input of a kinked layer
   moved and ended on the other side of (or exactly on) a kink, compared with
   the unperturbed pass -- this is how a perturbation of a parameter reaches
   a kink several layers deeper; or the loss is within reach of its named
   kink (for the residual 0: `|L(p)| <= |L(p +- h e_j) - L(p)|`, or `|L(p)|`
   within `100 eps |y|` of the network's dtype: a float32 network exactly at
   zero error is a hair off it in the float64 copy); and
2. the analytic value lies, up to the tolerance plus a first-order slack
   `100 h (|slopes| + floor)`, inside an interval of admissible derivatives:
   between the one-sided differences `(L(p+h) - L(p)) / h` and
   `(L(p) - L(p-h)) / h`; at the residual 0, where `L = k |e|` is a norm, in
   `[-s, s]` with `s^2 = (L(p+h)^2 + L(p-h)^2 - 2 L(p)^2) / (2 h^2)`, the
   subdifferential of the norm; or inside the *interval chain rule* at the first
   kinked elementwise layer the perturbation reaches. There `dL/dt` splits
   into the part through the elements that stay on their side, plus, for
   every element c that reaches a kink, the product of three intervals: the
   rate `dz_c/dt` on either side of `t = 0`, the activation's one-sided
   slopes at `z_c`, and the one-sided derivatives of the rest of the network
   with respect to the element's output `a_c` (themselves split again where
   they reach a deeper kink). Every choice of slope between the one-sided
   ones at every kink element lands inside; that is what keeps many elements
   at a kink at once (a Dense pre-activation exactly 0 for a whole sample,
   moved by one input in both directions; zero pre-activations in several
   layers at once) from ever being flagged for a correct layer, although the
   network's own one-sided slopes need not bracket the convention there.

The report counts the entries accepted this way; they are left out of the
error columns. `check_layer` applies the same rule entry by entry of the
Jacobian: entry `(i, r, j)` is accepted between its one-sided differences, or
inside the interval chain rule with the output `y_ir` in the role of `L`, when
moving `x_ij` (or the parameter) reaches a kink in sample i. The Taylor
test leaves out the steps that reach a kink, and says it cannot judge when
the smallest steps all do.

The vectorized full check
-------------------------
For a `Sequential` (nested stacks are flattened), the prefix up to layer `l`
runs once; the outputs of layer `l` under every perturbation of one of its
parameters are stacked as extra batch rows -- a layer whose hook
`Layer._affine_param_change` describes the change says it with no call at
all (Dense: moving `W[j, k]` by `h` moves output column `j` by `h x[:, k]`;
Conv2D: moving `W[o, c, i, j]` moves every position of output channel `o` by
`h` times the matching im2col row of x; every checker first compares each
hook with the layer's forward pass at a few random coordinates, reports one
that disagrees as a failing "hook ..." entry, and does without it: `hooks.py`);
any other layer is evaluated once per coordinate on its own input -- and the
rows go through the rest of the network in batched forward passes, chunked to
about 16 MiB per array. `loss.per_sample` then gives one row of per-sample
losses per perturbation, reduced per group (`loss.reduce`; as one array sum
when the loss keeps the base class's mean/sum reduction). The input `x` costs
2n evaluations for all `B` samples, since samples never interact -- unless
the network says they do (`couples_samples`, BatchNorm in train mode): then
every entry of `x` is its own perturbation of the whole batch (2Bn), and a
coupled layer sees each perturbed batch on its own, never stacked.
"""

from .differences import numerical_jacobian
from .layercheck import check_layer, dottest
from .netcheck import gradcheck
from .reports import CheckEntry, GradcheckReport, TaylorReport
from .taylor import taylor_test
from .tolerance import CENTRAL_STEP, RICHARDSON_STEP, default_rtol

__all__ = [
    "numerical_jacobian",
    "dottest",
    "check_layer",
    "gradcheck",
    "taylor_test",
    "CheckEntry",
    "GradcheckReport",
    "TaylorReport",
    "CENTRAL_STEP",
    "RICHARDSON_STEP",
    "default_rtol",
]
