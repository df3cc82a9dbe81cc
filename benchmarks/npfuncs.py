"""Benchmark task functions in a module that imports numpy and scipy, the way users write
them: importable by reference, so a worker imports this module (and numpy, scipy) on its
first call of any of them."""

import numpy as np
import scipy
import scipy.linalg


def trivial(x):
    return x + 1


def np_sum(x):
    return float(np.arange(4.0).sum() * x)


def scipy_norm(x):
    return float(np.sum(scipy.linalg.norm(np.arange(4.0) * x)))


def version():
    return np.__version__, scipy.__version__
