"""NumPy views of JAX arrays that live in host memory, without a copy.

The offload engine's CPU worker reads the GPU's q/k/v (and the prefill's k/v) from `pinned_host` arrays
that the jitted steps write, and hands its attention output to the next step in a `pinned_host` array.
`np.asarray` of such an array is zero-copy on JAX's CPU backend, and on a GPU may copy (into a fresh,
pageable array: 7.2 MB of q a call at μ=880, 32 heads x 128 in bfloat16); `jax.device_put` of a NumPy
array into `pinned_host` copies, and the H200's g64 run spent 11.8 ms a layer-step in that hand-off.
A view of the buffer itself costs neither. `check` tests on the running backend that views see what JAX
sees, both ways, and the engine logs which path it takes; MOE_JAX_HOST_VIEWS=0 turns views off (`wanted`:
the copies then, to compare the two or to step around a backend where views misbehave).

Writing through a view changes an array JAX treats as immutable: the caller must know that no JAX
computation still to run reads the old contents, and that none reads the new ones before they are written
(the engine writes a micro-batch's output only after every step that read the last one has given its results),
and nothing may fill JAX's host-value cache of that array (`np.asarray` of it on a GPU: a copy JAX then keeps).
A view outlives neither `x.delete()` nor a donation of x, which free the buffer under it: never donate an array
a view may still read or write.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

HOST_KINDS = ("pinned_host", "unpinned_host")
SWITCH_VAR = "MOE_JAX_HOST_VIEWS"  # "0": no views


def wanted() -> bool:
    """False where MOE_JAX_HOST_VIEWS=0 asks for copies instead of views (read at each call)."""
    return os.environ.get(SWITCH_VAR) != "0"


class _Buffer:
    """A host buffer's bytes for NumPy (`__array_interface__`), holding the JAX array that owns them."""

    def __init__(self, x: jax.Array, address: int):
        self.owner = x
        self.__array_interface__ = {"data": (address, False), "shape": (x.nbytes,), "typestr": "|u1", "version": 3}


def host_view(x: jax.Array, writable: bool = False) -> np.ndarray:
    """x (one device's array in host memory: a `pinned_host` or `unpinned_host` memory kind, or any array on
    the CPU backend; row-major) as a NumPy array over its buffer, once x is ready; read-only as `np.asarray`
    gives it (numba compiles a kernel per writability of its inputs), unless `writable`. The view holds x: the
    buffer lives as long as the view or x does."""
    shards = x.addressable_shards
    kind = x.sharding.memory_kind
    if len(shards) != 1 or not x.is_fully_addressable:
        raise ValueError(f"host_view: an array on one device, got {len(shards)} shards of shape {x.shape}")
    if kind not in HOST_KINDS and shards[0].device.platform != "cpu":
        raise ValueError(f"host_view: an array in host memory, got memory kind {kind!r} on "
                         f"{shards[0].device.platform}")
    layout = x.format.layout
    order = [d for d in layout.major_to_minor if x.shape[d] != 1]  # size-1 dims: anywhere, the same bytes
    tiling = getattr(layout, "tiling", None)  # None or (): untiled (a JAX without the attribute: its private name)
    tiling = tiling if tiling is not None else getattr(layout, "_tiling", None)
    if order != sorted(order) or tiling:
        raise ValueError(f"host_view: a row-major array, got layout major_to_minor={layout.major_to_minor}, "
                         f"tiling={tiling} for shape {x.shape}")
    x.block_until_ready()
    view = (np.empty(x.shape, x.dtype) if x.nbytes == 0 else
            np.asarray(_Buffer(x, x.unsafe_buffer_pointer())).view(x.dtype).reshape(x.shape))
    view.flags.writeable = writable
    return view


@functools.lru_cache(maxsize=None)
def check(on_host: jax.sharding.Sharding, on_device: jax.sharding.Sharding) -> str | None:
    """None where views of arrays in `on_host` work on this backend, else why not: a jitted call's output in
    on_host reads the same through a view as through `np.asarray`, and what a view writes into an on_host array
    is what a jitted call that takes that array to `on_device` gets, twice into the same array as the engine
    reuses its output's (random bfloat16 values, 2 MiB). Once per pair: a failure stands for the process."""
    src = np.random.default_rng(0).standard_normal((1024, 1024)).astype(jnp.bfloat16)
    try:
        made = jax.jit(lambda a: jax.device_put(a * 2, on_host))(jax.device_put(src, on_device))
        if not np.array_equal(host_view(made), np.asarray(made)):
            return "a view of a jitted call's output in host memory read other values than np.asarray"
        buf = jax.device_put(np.zeros_like(src), on_host)
        step = jax.jit(lambda a: jax.device_put(a, on_device) * 2)
        for want in (src, -src):
            host_view(buf, writable=True)[...] = want
            if not np.array_equal(np.asarray(step(buf)), want * 2):
                return "a jitted call did not see what a view wrote into its host-memory input"
    except (ValueError, RuntimeError, TypeError, AttributeError) as e:  # no such memory kind, no layout, no pointer
        return f"{type(e).__name__}: {e}"
    return None
