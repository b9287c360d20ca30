"""What the host CPU computes natively, read from the kernel's CPU flags (torch.backends.cpu.get_cpu_capability()
stops at 'AVX512' and says nothing of BF16 or VNNI)."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The 'flags' (x86) or 'Features' (ARM) of /proc/cpuinfo; empty where there is none (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(f for line in text.splitlines() if line.startswith(("flags", "Features")) for f in line.split())


def native_bf16() -> str | None:
    """The CPU feature that computes bfloat16 natively (x86 AMX-BF16 or AVX512-BF16, ARM BF16), or None."""
    flags = cpu_flags()
    for feature in ("amx_bf16", "avx512_bf16", "bf16"):  # "bf16" is ARM's name in the Features line
        if feature in flags:
            return feature
    if sys.platform == "darwin":  # Apple silicon from M2 on; no /proc there
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
            return "FEAT_BF16" if out.stdout.strip() == "1" else None
        except OSError:
            return None
    return None


def native_int8() -> str | None:
    """The x86 feature that multiplies int8 matrices natively (AMX-INT8, AVX512-VNNI, AVX-VNNI), or None. Only x86
    counts: torch's int8 matrix product (`torch._int_mm`) runs through oneDNN there and is a slow loop elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    flags = cpu_flags()
    return next((f for f in ("amx_int8", "avx512_vnni", "avx_vnni") if f in flags), None)
