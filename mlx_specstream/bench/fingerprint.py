"""What a result was measured on: backend, device, memory, OS, versions, the BLAS mapped."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm


def blas_in_use() -> str:
    if sys.platform == "darwin":
        return "Accelerate"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    libs = sorted({line.split()[-1] for line in maps.splitlines() if "blas" in line.lower() and "/" in line})
    return ", ".join(libs) or "mlx built-in (reference BLAS)"


def fingerprint() -> dict:
    dev = mx.default_device()
    info = {}
    try:
        info = dict(mx.device_info())
    except Exception:  # noqa: BLE001
        pass
    backend = "cpu" if dev.type == mx.cpu else ("metal" if mx.metal.is_available() else "cuda")
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "backend": backend, "device": info.get("device_name") or info.get("architecture") or str(dev),
        "device_info": {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in info.items()},
        "memory_gb": round(mem, 1) if mem else None, "os": platform.platform(), "python": platform.python_version(),
        "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "blas": blas_in_use() if backend == "cpu" else None,
        "cpu_count": os.cpu_count(),
    }
