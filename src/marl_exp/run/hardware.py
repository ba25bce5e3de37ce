"""What the machine computes fast: the instruction sets that decide a CPU's matmul speed per dtype, and whether
the run's device does bf16 matmuls natively (the plan's precision line, the benchmarks' machine records)."""

from __future__ import annotations

from pathlib import Path

# A CPU with either runs bf16 matmuls in hardware (AMX: ~7x its fp32 rate; AVX512-BF16: ~2-3x here); without
# them, torch emulates bf16 and it can be slower than fp32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``); empty where that file does not exist."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str) -> str | None:
    """Why ``device`` ("cpu" or "cuda") computes bf16 matmuls natively, or None when it does not (or cannot say)."""
    if device == "cuda":
        import torch

        return "this GPU computes bf16 natively" if torch.cuda.is_bf16_supported() else None
    found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
    return f"this CPU has {found[0]}" if found else None
