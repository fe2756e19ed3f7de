"""The hierarchical roofline picture is written for CPU and GPU attention placements."""
import pytest

from moe_jax.hrm import PROFILES
from moe_jax.hrm.roofline_plot import plot_roofline
from moe_jax.offload_policy import Policy


@pytest.mark.parametrize("attention, kv", [("cpu", "cpu"), ("gpu", "cpu"), ("gpu", "gpu")])
def test_plot_roofline(tmp_path, mixtral, attention, kv):
    path = tmp_path / "roofline.png"
    plot_roofline(mixtral, PROFILES["l4"], Policy(4536, 324, 14, 0.056, attention, kv), 77, 32, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
