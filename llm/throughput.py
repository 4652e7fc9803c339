"""How fast training runs: tokens per second, and MFU (model FLOPs used / the device's peak FLOPs)."""

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from llm.errors import InputError

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s of known accelerators (vendor datasheets, without sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read afterwards includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PEAK_FLOPS_VARIABLE = "LLM_PEAK_FLOPS"


def peak_flops(device: torch.device, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from): a datasheet for known GPUs, else measured here with
    large matmuls. For bfloat16 the peak is the faster of bf16 and fp32 matmuls: a CPU without bf16
    instructions runs autocast's small bf16 matmuls faster than its large ones, and MFU must stay below 1.
    The environment variable LLM_PEAK_FLOPS (FLOP/s per device, e.g. a datasheet figure) replaces the
    measurement, which takes about a second."""
    if os.environ.get(PEAK_FLOPS_VARIABLE):
        try:
            given = float(os.environ[PEAK_FLOPS_VARIABLE])
        except ValueError:
            given = math.nan
        if not (math.isfinite(given) and given > 0):
            raise InputError(f"{PEAK_FLOPS_VARIABLE}={os.environ[PEAK_FLOPS_VARIABLE]}: must be a positive "
                             "FLOP/s figure")
        return given, f"{PEAK_FLOPS_VARIABLE} (environment)"
    return _device_peak(device, dtype)


@functools.cache
def _device_peak(device: torch.device, dtype: str) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name and dtype == "bfloat16":
                return flops, f"datasheet {key} bf16 dense"
    measured = measure_matmul_flops(device, dtype)
    if dtype == "bfloat16":
        fp32 = measure_matmul_flops(device, "float32")
        if fp32 > 2 * measured:
            log.warning("bfloat16 matmuls run %.0fx slower than float32 on this %s: train.dtype float32 trains "
                        "faster here", fp32 / measured, device.type)
        if fp32 > measured:
            return fp32, f"measured float32 matmul on {device.type} (faster than bfloat16 here)"
    return measured, f"measured {dtype} matmul on {device.type}"


def measure_matmul_flops(device: torch.device, dtype: str, max_n: int = 2048, budget_s: float = 0.5) -> float:
    """Best timing of square matmuls in `dtype`, grown from 256 until one takes 50 ms or reaches `max_n`,
    then repeated for about `budget_s` seconds. The best is the machine's capability, the rest is noise from
    whatever else shares it. Growing the size keeps this short where `dtype` is slow: a CPU without bf16
    instructions multiplies bf16 matrices 50x slower than fp32, and a fixed 2048 would take minutes."""
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG (dropout) untouched

    def timed(a: torch.Tensor, b: torch.Tensor, repeats: int = 1) -> float:
        """Seconds per matmul, over `repeats` of them queued back to back."""
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        return (time.perf_counter() - start) / repeats

    n = 256
    while True:
        a = torch.randn(n, n, device=device, dtype=torch_dtype, generator=generator)
        b = torch.randn(n, n, device=device, dtype=torch_dtype, generator=generator)
        timed(a, b)  # warm-up: first-call set-up is not the device's speed
        seconds = timed(a, b)
        if seconds >= 0.05 or n >= max_n:
            break
        n *= 2
    repeats = math.ceil(0.05 / seconds)  # a GPU does a 2048 matmul in microseconds: time many at once
    best, spent = seconds, seconds
    while spent < budget_s:
        seconds = timed(a, b, repeats)
        best, spent = min(best, seconds), spent + seconds * repeats
    return 2 * n**3 / best


class ThroughputMeter:
    """Tokens per second over each log interval (a lap), and over the whole run without its first lap, which
    pays for compilation and warm-up. Time spent in `paused()` (evaluation, checkpoints) is not counted.
    The run totals travel in checkpoints (`state_dict`), so a resumed run reports the whole run's speed, and
    its MFU against the peak of the machine each lap ran on (a run that resumes a checkpoint which already
    completes it reports the figures it trained at, whatever the peak measures now)."""

    def __init__(self, tokens_per_step: int, flops_per_token: int, peak_flops: float, device: torch.device) -> None:
        self.tokens_per_step, self.flops_per_token, self.peak, self.device = (
            tokens_per_step, flops_per_token, peak_flops, device)
        self.run_tokens, self.run_seconds = 0, 0.0
        self.run_peak_flop = 0.0  # the sum of peak FLOP/s x seconds over the counted laps
        self.laps, self.last_tokens_per_sec, self.last_peak = 0, 0.0, peak_flops
        self._start, self._steps, self._paused = time.perf_counter(), 0, 0.0

    def step(self) -> None:
        self._steps += 1

    def lap(self) -> float:
        """End the current interval; its tokens per second."""
        sync(self.device)
        now = time.perf_counter()
        seconds = now - self._start - self._paused
        tokens = self._steps * self.tokens_per_step
        self.last_tokens_per_sec, self.last_peak = (tokens / seconds if seconds > 0 else 0.0), self.peak
        if self.laps > 0:
            self.run_tokens += tokens
            self.run_seconds += seconds
            self.run_peak_flop += self.peak * seconds
        self.laps += 1
        self._start, self._steps, self._paused = now, 0, 0.0
        return self.last_tokens_per_sec

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start

    @property
    def run_tokens_per_sec(self) -> float:
        """The run's speed: over every lap but the first, or the only lap there was."""
        return self.run_tokens / self.run_seconds if self.run_seconds else self.last_tokens_per_sec

    @property
    def run_peak(self) -> float:
        """The peak FLOP/s the run's counted laps ran against, weighted by their time (with one lap, that lap's)."""
        return self.run_peak_flop / self.run_seconds if self.run_seconds else self.last_peak

    @property
    def run_mfu(self) -> float:
        return self.flops_per_token * self.run_tokens_per_sec / self.run_peak

    def mfu(self, tokens_per_sec: float) -> float:
        """MFU of a lap that ran now, on this device."""
        return self.flops_per_token * tokens_per_sec / self.peak

    # What state_dict holds; a checkpoint without one of these is damaged (llm/checkpoint.py checks).
    STATE_KEYS = ("run_tokens", "run_seconds", "run_peak_flop", "last_tokens_per_sec", "last_peak")

    def state_dict(self) -> dict[str, Any]:
        return {"run_tokens": self.run_tokens, "run_seconds": self.run_seconds, "run_peak_flop": self.run_peak_flop,
                "last_tokens_per_sec": self.last_tokens_per_sec, "last_peak": self.last_peak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_tokens, self.run_seconds = state["run_tokens"], state["run_seconds"]
        self.run_peak_flop = state["run_peak_flop"]
        self.last_tokens_per_sec, self.last_peak = state["last_tokens_per_sec"], state["last_peak"]
