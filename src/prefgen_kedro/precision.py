"""Which precision a ``mixed_precision`` request runs in on this machine.

bf16 autocast pays on a GPU and on a CPU with native bf16 instructions (AVX512-BF16, AMX,
ARM's BF16 extension). Elsewhere PyTorch emulates it: an AVX2-only CPU trained the user
branches at 8.9 s a step under bf16 against about 0.2 s natively. There a bf16 request runs
in fp32 (logged once per process), which changes the figures only by rounding.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo flags of native bf16 arithmetic (x86: AVX512-BF16, AMX; ARM: FEAT_BF16).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux), or None where there is none."""
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        label, _, values = line.partition(":")
        if label.strip() in ("flags", "Features"):  # x86, ARM
            flags.update(values.split())
    return frozenset(flags)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (elsewhere PyTorch's bf16 is emulated)."""
    flags = cpu_flags()
    if flags is None:  # no /proc/cpuinfo: ask PyTorch's x86 probe
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(flags & NATIVE_BF16_FLAGS)


def effective_precision(requested: str, device: torch.device | str) -> str:
    """``requested`` ("no", "bf16", "fp16"), except bf16 on a CPU without native bf16: "no"."""
    if requested != "bf16" or torch.device(device).type != "cpu":
        return requested
    return "bf16" if _native_bf16_noted() else "no"


@functools.cache
def _native_bf16_noted() -> bool:
    native = cpu_has_native_bf16()
    if not native:
        logger.info(
            "This CPU has no native bf16 (none of %s): bf16 autocast runs in fp32 instead",
            ", ".join(sorted(NATIVE_BF16_FLAGS)),
        )
    return native
