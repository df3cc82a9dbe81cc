"""Caching of task results in a directory of HDF5 files, one file per task.

Public helpers (usable without an executor): :func:`get_cache_data`,
:func:`get_future_from_cache`, :func:`clear_cache`, and :class:`CacheCorruptionWarning`,
the warning issued for an unreadable cache file.

The executor engine uses :class:`CacheStore`, :class:`CacheRecord`, :func:`compute_key` and
:func:`validate_cache_key`, re-exported here but kept out of ``__all__``.  Importing this
package loads neither h5py nor pandas.
"""

from __future__ import annotations

from executorkit.cache._access import clear_cache, get_future_from_cache
from executorkit.cache._frame import get_cache_data
from executorkit.cache._keys import compute_key as compute_key
from executorkit.cache._keys import validate_cache_key as validate_cache_key
from executorkit.cache._store import CacheCorruptionWarning
from executorkit.cache._store import CacheRecord as CacheRecord
from executorkit.cache._store import CacheStore as CacheStore

__all__ = ["CacheCorruptionWarning", "clear_cache", "get_cache_data", "get_future_from_cache"]
