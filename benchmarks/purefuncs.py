"""A pure-Python benchmark task of about 40 us (no numpy in this module)."""


def spin(x, n=600):
    """About 40 us of CPU on the 2-core development machine."""
    s = 0
    for i in range(n):
        s += i ^ x
    return s
