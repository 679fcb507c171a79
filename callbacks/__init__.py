"""Lightning callbacks that gigagpt adds."""

if __name__ != "gigagpt.callbacks":  # the repository's folder reached as a top-level package: a second copy
    raise ImportError(f"this package installs as gigagpt.callbacks; import that, not {__name__}")


from gigagpt.callbacks.guard import NonFiniteGuard, NonFiniteLossError
from gigagpt.callbacks.progress import ThrottledRichProgressBar
from gigagpt.callbacks.rng import StepSeed
from gigagpt.callbacks.samples import TextSamples
from gigagpt.callbacks.summary import GPTSummary
from gigagpt.callbacks.throughput import ThroughputMFU, flops_per_token, peak_flops

__all__ = ["GPTSummary", "NonFiniteGuard", "NonFiniteLossError", "StepSeed", "TextSamples", "ThrottledRichProgressBar",
           "ThroughputMFU", "flops_per_token", "peak_flops"]
