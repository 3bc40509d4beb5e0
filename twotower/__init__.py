"""TwoTower: a frozen AR context tower + a denoiser tower, decoding blocks by diffusion."""
from .events import BlockCommitted, BlockStart, Done, Event, Prefill, Step, Token
from .sampling import SamplerConfig
from .trace import Trace

__all__ = ["BlockCommitted", "BlockStart", "Done", "Event", "Prefill", "SamplerConfig", "Step",
           "Token", "Trace"]
