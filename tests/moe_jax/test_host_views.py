"""host_views: NumPy views of JAX arrays in host memory read and write what JAX reads and writes."""
import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from moe_jax import host_views

DEV = jax.devices()[0]
ON_HOST = SingleDeviceSharding(DEV, memory_kind="pinned_host")
ON_DEVICE = SingleDeviceSharding(DEV, memory_kind="device")


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int32])
def test_view_reads_a_jitted_output_in_pinned_memory(dtype):
    x = np.random.default_rng(1).standard_normal((5, 3, 7)).astype(dtype)
    made = jax.jit(lambda a: jax.device_put(a + a, ON_HOST))(jax.device_put(x, ON_DEVICE))
    view = host_views.host_view(made)
    assert view.dtype == np.dtype(dtype) and view.shape == (5, 3, 7) and not view.flags.writeable
    np.testing.assert_array_equal(view, np.asarray(made))
    np.testing.assert_array_equal(view, x + x)


def test_what_a_view_writes_reaches_the_next_jitted_call():
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(ml_dtypes.bfloat16)
    buf = jax.device_put(np.zeros_like(x), ON_HOST)
    step = jax.jit(lambda a: jax.device_put(a, ON_DEVICE) * 2)
    view = host_views.host_view(buf, writable=True)
    for scale in (1, 3):  # the buffer reused, as the engine reuses a micro-batch's output
        view[...] = x * scale
        np.testing.assert_array_equal(np.asarray(step(buf)), (x * scale).astype(np.float32) * 2)


def test_view_holds_its_array():
    made = jax.device_put(np.arange(12, dtype=np.float32).reshape(3, 4), ON_HOST)
    view = host_views.host_view(made)
    del made
    np.testing.assert_array_equal(view, np.arange(12, dtype=np.float32).reshape(3, 4))


def test_empty_array():
    assert host_views.host_view(jax.device_put(np.zeros((0, 4), np.float32), ON_HOST)).shape == (0, 4)


def test_check_passes_on_this_backend():
    assert host_views.check(ON_HOST, ON_DEVICE) is None


def test_switch(monkeypatch):
    assert host_views.wanted()
    monkeypatch.setenv("MOE_JAX_HOST_VIEWS", "0")
    assert not host_views.wanted()


def test_size_one_dims_may_lie_anywhere_in_the_layout():
    class Array:  # what host_view asks of an array: (3, 1, 4) with its size-1 dim listed first
        addressable_shards = [None]
        is_fully_addressable = True
        shape, ndim, sharding = (3, 1, 4), 3, ON_HOST
        format = type("F", (), {"layout": type("L", (), {"major_to_minor": (1, 0, 2), "tiling": ()})})

        def block_until_ready(self):
            raise AssertionError("reached the view: the layout was taken")  # (stands for the rest of host_view)

    with pytest.raises(AssertionError, match="the layout was taken"):
        host_views.host_view(Array())
    Array.format.layout.major_to_minor = (2, 0, 1)  # columns first
    with pytest.raises(ValueError, match=r"a row-major array, got layout major_to_minor=\(2, 0, 1\)"):
        host_views.host_view(Array())


def test_sharded_array_is_refused():
    class Two:  # what host_view asks of an array, with two shards
        addressable_shards = [None, None]
        is_fully_addressable = True
        shape = (2,)
        sharding = ON_HOST
    with pytest.raises(ValueError, match="one device, got 2 shards"):
        host_views.host_view(Two())
