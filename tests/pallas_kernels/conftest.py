"""Fixtures for the expert-FFN kernel tests: routed random problems and a float64 reference."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest


@dataclasses.dataclass
class Problem:
    """One moe_ffn input set (NumPy, already in the test dtype) and its float64 reference."""

    x: np.ndarray
    topk_ids: np.ndarray
    topk_weights: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray
    expert_slots: np.ndarray | None
    ref: np.ndarray

    @property
    def args(self):
        return (self.x, self.topk_ids, self.topk_weights, self.w_gate, self.w_up, self.w_down)


def reference(x, topk_ids, topk_weights, w_gate, w_up, w_down, expert_slots):
    """float64 NumPy `Σ_j w[t,j] · FFN_{slot(ids[t,j])}(x[t])` with SwiGLU FFNs."""
    f64 = lambda a: np.asarray(a, np.float64)
    x, w_gate, w_up, w_down = map(f64, (x, w_gate, w_up, w_down))
    slots = topk_ids if expert_slots is None else np.asarray(expert_slots)[topk_ids]
    y = np.zeros_like(x)
    for j in range(topk_ids.shape[1]):
        s = slots[:, j]
        g = np.einsum("th,thf->tf", x, w_gate[s])
        u = np.einsum("th,thf->tf", x, w_up[s])
        h = g / (1 + np.exp(-g)) * u
        y += f64(topk_weights[:, j])[:, None] * np.einsum("tf,tfh->th", h, w_down[s])
    return y


def route(rng, T, E, k, routing):
    """int32 `[T, k]` distinct expert ids per token.

    "uniform": every expert equally likely. "skewed": expert E-1 is every token's first choice
    with probability 0.9, and experts 0 and 1 receive no tokens (needs E ≥ k + 2).
    """
    allowed = np.arange(E) if routing == "uniform" else np.arange(2, E)
    ids = np.stack([rng.permutation(allowed)[:k] for _ in range(T)])
    if routing == "skewed":
        hot = rng.random(T) < 0.9
        has_hot = (ids == E - 1).any(axis=1)
        swap = hot & ~has_hot
        ids[swap, 0] = E - 1
    return ids.astype(np.int32)


@pytest.fixture
def make_problem():
    """`make_problem(T, H, F, E, k, dtype, routing="uniform", num_slots=None, seed=0)`.

    With num_slots > E the experts sit in a random permutation of the slots (`expert_slots`).
    """

    def make(T, H, F, E, k, dtype, routing="uniform", num_slots=None, seed=0):
        rng = np.random.default_rng(seed)
        S = num_slots or E
        expert_slots = None if S == E else rng.permutation(S)[:E].astype(np.int32)
        cast = lambda a: np.asarray(jax.numpy.asarray(a, dtype))
        x = cast(rng.standard_normal((T, H)))
        w_gate = cast(rng.standard_normal((S, H, F)) / np.sqrt(H))
        w_up = cast(rng.standard_normal((S, H, F)) / np.sqrt(H))
        w_down = cast(rng.standard_normal((S, F, H)) / np.sqrt(F))
        topk_ids = route(rng, T, E, k, routing)
        topk_weights = rng.dirichlet(np.ones(k), size=T).astype(np.float32)
        ref = reference(x, topk_ids, topk_weights, w_gate, w_up, w_down, expert_slots)
        return Problem(x, topk_ids, topk_weights, w_gate, w_up, w_down, expert_slots, ref)

    return make


TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


@pytest.fixture
def assert_matches_reference():
    """`check(y, problem)`: max |y - ref| / max |ref| below the bound for the problem's dtype."""

    def check(y, problem):
        assert y.shape == problem.ref.shape and y.dtype == problem.x.dtype
        err = np.abs(np.asarray(y, np.float64) - problem.ref).max() / np.abs(problem.ref).max()
        assert err < TOLERANCE[problem.x.dtype.name], err

    return check

