"""What the machine computes fast: the instruction sets that decide a CPU's matmul speed per dtype, and whether
the run's device does bf16 matmuls natively (the plan's precision line, the benchmarks' machine records)."""

from __future__ import annotations

from pathlib import Path

# A CPU with either runs bf16 matmuls in hardware (AMX: ~7x its fp32 rate; AVX512-BF16: ~2-3x here); without
# them, torch emulates bf16 and it can be slower than fp32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo`` on x86 Linux); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str) -> tuple[bool | None, str]:
    """Whether ``device`` ("cpu" or "cuda") computes bf16 matmuls natively, and why: (True, reason), (False, ""),
    or (None, "") where it cannot tell (a CPU whose flags cannot be read: macOS, ARM Linux)."""
    if device == "cuda":
        import torch

        # Without emulation: a pre-Ampere GPU "supports" bf16 only by emulating it, slower than fp16 or fp32.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, "this GPU computes bf16 natively"
        return False, ""
    flags = cpu_flags()
    if not flags:
        return None, ""
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    return (True, f"this CPU has {found[0]}") if found else (False, "")
