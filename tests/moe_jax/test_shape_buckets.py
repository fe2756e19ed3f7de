"""Shape buckets: 2^k and 3·2^(k-1) sizes, at most 1.5x padding up (`bucket`), the largest within n down."""
from __future__ import annotations

from moe_jax.shape_buckets import bucket, bucket_below

SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]


def test_bucket_is_the_smallest_size_at_or_above_n():
    assert [bucket(n) for n in (1, 8, 9, 12, 13, 16, 17, 77, 96, 97, 129, 1984, 2048)] == \
        [8, 8, 12, 12, 16, 16, 24, 96, 96, 128, 192, 2048, 2048]
    assert [bucket(n, 1) for n in (1, 2, 3, 4, 5, 6, 7)] == [1, 2, 3, 4, 6, 6, 8]
    for n in range(1, 2049):
        b = bucket(n, 1)
        assert b >= n and b in SIZES and not any(n <= s < b for s in SIZES), n


def test_bucket_below_is_the_largest_size_within_n():
    assert [bucket_below(n) for n in (0, 1, 2, 3, 5, 6, 7, 11, 12, 13, 95, 96, 97, 191, 192)] == \
        [1, 1, 2, 3, 4, 6, 6, 8, 12, 12, 64, 96, 96, 128, 192]
    for n in range(1, 2049):
        b = bucket_below(n)
        assert b <= n and b in SIZES and not any(b < s <= n for s in SIZES), n
