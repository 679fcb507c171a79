"""Facts about the CPU a run is on, and what follows from them: its measured matmul peak, and the
training precision that is fastest on it.

- :func:`cpu_facts` reads the model name, core count and instruction-set flags (``/proc/cpuinfo``).
- :func:`cpu_peak_flops` is the best of several short matrix-multiply probes, cached per machine in
  ``$GIGAGPT_CACHE_DIR`` (default ``~/.cache/gigagpt``) under the CPU model, core count, torch
  version and thread count. One probe on a busy machine reads low; the best of several, kept once
  measured, is what the machine can do.
- :func:`choose_cpu_precision` is a pure function of those facts: bf16 autocast runs the matrix
  multiplies on AMX tiles where the CPU has them (about twice the float32 speed); on CPUs with only
  ``avx512_bf16``, or no bf16 instructions at all, it is slower than float32.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from lightning.pytorch.utilities import rank_zero_only

from gigagpt.checkpoint import atomic_write

CACHE_ENV = "GIGAGPT_CACHE_DIR"
_PEAK_FILE = "cpu_peak.json"


@dataclass(frozen=True)
class CPUFacts:
    model: str
    cores: int
    flags: frozenset[str]

    @property
    def amx(self) -> bool:
        return {"amx_bf16", "amx_tile"} <= self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags


def parse_cpuinfo(text: str, cores: int | None = None) -> CPUFacts:
    """The facts of ``/proc/cpuinfo``'s text (the first processor's model name and flags)."""
    model, flags = "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = value
    return CPUFacts(model=model or platform.processor() or platform.machine() or "unknown CPU",
                    cores=cores if cores is not None else os.cpu_count() or 1,
                    flags=frozenset(flags.split()))


def cpu_facts() -> CPUFacts:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so no AMX assumed
        text = ""
    return parse_cpuinfo(text)


def choose_cpu_precision(facts: CPUFacts) -> tuple[str, str]:
    """``(precision, reason)`` for training on this CPU: the faster of bf16 autocast and float32."""
    if facts.amx:
        return "bf16-mixed", "this CPU has AMX (amx_bf16): bf16 matrix multiplies run about twice as fast"
    if facts.avx512_bf16:
        return "32-true", "this CPU has avx512_bf16 but no AMX: bf16 autocast would run at about half the speed"
    return "32-true", "this CPU has no AMX: bf16 autocast would run slower than float32"


def apply_cpu_precision(trainer_settings, subcommand: str | None) -> str | None:
    """For a ``fit`` on the CPU without ``trainer.precision``, set the faster precision in
    ``trainer_settings`` (the CLI's trainer settings, a mapping) and say so in one line (returned)."""
    if subcommand not in (None, "fit") or trainer_settings.get("precision") is not None:
        return None
    accelerator = str(trainer_settings.get("accelerator") or "auto").lower()
    gpu = torch.cuda.is_available() or (torch.backends.mps.is_available() and torch.backends.mps.is_built())
    if accelerator != "cpu" and not (accelerator == "auto" and not gpu):
        return None
    precision, reason = choose_cpu_precision(cpu_facts())
    trainer_settings["precision"] = precision
    line = f"gigagpt: trainer.precision {precision} ({reason}; set trainer.precision to choose)"
    if rank_zero_only.rank == 0:
        print(line, file=sys.stderr, flush=True)
    return line


# -- the measured matmul peak, cached per machine ------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gigagpt")


def machine_key(facts: CPUFacts | None = None) -> str:
    facts = facts or cpu_facts()
    return f"{facts.model} | {facts.cores} cores | torch {torch.__version__} | {torch.get_num_threads()} threads"


def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 512, seconds: float = 0.3,
                         device: str = "cpu") -> float:
    """Best FLOP/s of repeated ``size x size`` matrix multiplies over about ``seconds``."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    b = a.clone()
    torch.mm(a, b)  # warm up
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt > 0:
            best = max(best, 2 * size**3 / dt)
        if time.perf_counter() > deadline:
            return best


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: measure again
        return {}
    return data if isinstance(data, dict) else {}


def cpu_peak_flops(dtype: torch.dtype, probe: Callable[[torch.dtype, int], float] | None = None,
                   rounds: int = 3, sizes: tuple[int, ...] = (512, 1024)) -> float:
    """This machine's matmul peak at ``dtype``: from the cache, else the best of ``rounds`` probes
    at each of ``sizes`` (then cached). ``probe(dtype, size)`` measures one (default:
    :func:`measure_matmul_flops` over 0.1 s)."""
    probe = probe or (lambda d, n: measure_matmul_flops(d, size=n, seconds=0.1))
    path = cache_dir() / _PEAK_FILE
    key, name = machine_key(), str(dtype).removeprefix("torch.")
    cached = _read_cache(path)
    value = cached.get(key, {}).get(name) if isinstance(cached.get(key), dict) else None
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    best = 0.0
    for _ in range(rounds):
        for size in sizes:
            best = max(best, float(probe(dtype, size)))
            time.sleep(0.01)  # lets a briefly busy core come back between probes
    cached = _read_cache(path)  # another process may have written meanwhile
    entry = cached.get(key) if isinstance(cached.get(key), dict) else {}
    cached[key] = {**entry, name: max(best, float(entry.get(name, 0.0) or 0.0))}
    try:
        atomic_write(path, lambda f: f.write(json.dumps(cached, indent=1, sort_keys=True).encode()))
    except OSError:  # a read-only home: the peak is still right for this process
        pass
    return cached[key][name]
