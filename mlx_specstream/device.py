"""What this machine is: backend, device, memory, OS, versions, the BLAS in use — for bench
results, and for settings tuned on one machine and used on another."""

from __future__ import annotations

import os
import platform
import re
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


def blas_kind() -> str:
    """The BLAS MLX's CPU backend computes float32 matmuls with: an optimised one that is mapped
    (OpenBLAS, MKL, BLIS — numpy's private ``scipy_openblas`` does not count: its symbols are
    renamed), Accelerate on macOS, else MLX's bundled reference BLAS."""
    if sys.platform == "darwin":
        return "accelerate"
    for lib in blas_in_use().split(", "):
        m = re.search(r"openblas|mkl|blis", lib.lower())
        if m and "scipy_openblas" not in lib:
            return m.group(0)
    return "reference"


def tuned_on() -> dict:
    """The part of the fingerprint decode settings depend on."""
    fp = fingerprint()
    return {"backend": fp["backend"], "device": fp["device"], "blas": blas_kind() if fp["backend"] == "cpu" else None}


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
        "backend": backend,
        "device": info.get("device_name") or info.get("architecture") or str(dev),
        "device_info": {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in info.items()},
        "memory_gb": round(mem, 1) if mem else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "blas": blas_in_use() if backend == "cpu" else None,
        "cpu_count": os.cpu_count(),
    }
