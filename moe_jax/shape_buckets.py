"""Lengths rounded to a few sizes, so that jitted calls compile few shapes."""


def bucket(n: int, minimum: int = 8) -> int:
    """The smallest 2^k or 3·2^(k-1) that is >= max(n, minimum): at most 1.5x padding, few shapes."""
    n = max(n, minimum)
    p = 1 << (n - 1).bit_length()
    return 3 * p // 4 if 3 * p // 4 >= n and p >= 4 else p


def bucket_below(n: int) -> int:
    """The largest 2^k or 3·2^(k-1) that is <= max(n, 1): a bucket that stays within n."""
    n = max(n, 1)
    p = 1 << (n.bit_length() - 1)  # the largest power of two <= n
    return 3 * p // 2 if p >= 2 and 3 * p // 2 <= n else p
