"""Matmul FLOP/s per dtype on this machine, as the train stage measures its peak for MFU, and what
`train.dtype: auto` resolves to here.

    python benchmarks/matmul_peak.py
"""

import time

import torch

from llm.distributed import default_device
from llm.throughput import measure_matmul_flops
from llm.train import has_fast_bf16, resolve_dtype


def main() -> None:
    device = default_device()
    measured = {}
    for dtype in ("float32", "bfloat16"):
        start = time.perf_counter()
        measured[dtype] = measure_matmul_flops(device, dtype)
        print(f"{dtype}: {measured[dtype] / 1e9:,.1f} GFLOP/s (measured in {time.perf_counter() - start:.1f} s)")
    print(f"bf16 / fp32: {measured['bfloat16'] / measured['float32']:.3f}; hardware bf16: {has_fast_bf16(device)}; "
          f"train.dtype auto -> {resolve_dtype('auto', device)}; torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
