"""Moved to ``gpusq.codes`` (INT4 packing lives in one place); re-exported for old imports."""

from gpusq.codes import pack_int4, unpack_int4

__all__ = ["pack_int4", "unpack_int4"]
