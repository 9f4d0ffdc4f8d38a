"""The process's peak resident memory, as reports give it: once when the fold is done and once
when verification is, so that what verifying a big model costs (two onnxruntime sessions, each
holding the weights) is told apart from what folding it costs."""

from __future__ import annotations

import sys


def peak_rss_mb() -> float | None:
    """The peak resident set size of this process so far, in MiB; None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes there, KiB on Linux
