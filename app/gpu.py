"""`spaces.GPU` on Hugging Face ZeroGPU Spaces, a no-op everywhere else."""
from __future__ import annotations

try:
    import spaces
except ImportError:     # not on a Space: the package is optional
    spaces = None


def gpu(duration: int):
    """Decorator asking ZeroGPU for a GPU for up to `duration` seconds per call."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)
