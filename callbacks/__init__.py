"""Lightning callbacks that gigagpt adds."""

from callbacks.guard import NonFiniteGuard, NonFiniteLossError
from callbacks.progress import ThrottledRichProgressBar
from callbacks.rng import StepSeed
from callbacks.samples import TextSamples
from callbacks.throughput import ThroughputMFU, flops_per_token, peak_flops

__all__ = ["NonFiniteGuard", "NonFiniteLossError", "StepSeed", "TextSamples", "ThrottledRichProgressBar",
           "ThroughputMFU", "flops_per_token", "peak_flops"]
