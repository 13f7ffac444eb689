"""Fast BLAS for MLX's Linux CPU backend.

The Linux ``mlx-cpu`` wheel links a bundled *reference* BLAS, about 30x slower
than OpenBLAS for fp32 matmul. ``libmlx.so`` leaves ``cblas_sgemm`` and friends
undefined and finds them through the dynamic linker, which searches the global
scope first; loading an OpenBLAS with ``RTLD_GLOBAL`` *before* ``mlx.core`` is
imported therefore reroutes every GEMM to it. Nothing happens on macOS, where
MLX uses Accelerate / Metal.

Where the library comes from, in order:
1. ``MONDRIAN_BLAS``: a path to a BLAS shared library, or ``off`` to disable;
2. Debian's ``libopenblas0-pthread`` (``.../openblas-pthread/libblas.so.3``);
3. the unprefixed ``libopenblasp-*.so`` that opencv-python (an mlx-vlm
   dependency, so always installed with us) ships in ``opencv_python.libs/``.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import platform
import sys
from dataclasses import asdict, dataclass

SLOW_WARNING = (
    "MLX is using its bundled reference BLAS (about 30x slower on Linux); "
    "set MONDRIAN_BLAS to an OpenBLAS library or install libopenblas0-pthread"
)


@dataclass
class BlasStatus:
    platform: str
    backend: str  # "openblas", "reference", "system" (macOS / not applicable)
    path: str | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


_status: BlasStatus | None = None


def candidates() -> list[str]:
    """OpenBLAS libraries that can stand in for the reference BLAS, best first."""
    found = []
    for libdir in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        path = os.path.join(libdir, "openblas-pthread", "libblas.so.3")
        if os.path.exists(path):
            found.append(path)
    spec = importlib.util.find_spec("cv2")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        libs = os.path.join(os.path.dirname(root), "opencv_python.libs")
        found.extend(sorted(glob.glob(os.path.join(libs, "libopenblas*.so*"))))
    return found


def preload() -> BlasStatus:
    """Load OpenBLAS globally before MLX; idempotent. Returns what happened."""
    global _status
    if _status is not None:
        return _status
    system = platform.system()
    if system != "Linux":
        _status = BlasStatus(system, "system", None, "not Linux: MLX uses the platform BLAS")
        return _status
    choice = os.environ.get("MONDRIAN_BLAS", "").strip()
    if choice.lower() in ("off", "0", "reference", "none"):
        _status = BlasStatus(system, "reference", None, "disabled by MONDRIAN_BLAS=off")
        return _status
    if "mlx.core" in sys.modules:
        # Too late to reroute symbols that may already be bound.
        _status = BlasStatus(system, "reference", None, "mlx.core was imported before mondrian")
        return _status
    paths = [choice] if choice else candidates()
    if not paths:
        _status = BlasStatus(system, "reference", None, "no OpenBLAS library found")
        return _status
    errors = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            lib.cblas_sgemm  # noqa: B018 - raises AttributeError if it is not a CBLAS
        except (OSError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
            continue
        _status = BlasStatus(system, "openblas", path, "preloaded before mlx.core")
        return _status
    _status = BlasStatus(system, "reference", None, "could not load: " + "; ".join(errors))
    return _status


def status() -> BlasStatus:
    return preload()


def warn_if_slow(stream=None) -> None:
    """Say so on stderr when MLX on Linux runs on the reference BLAS."""
    st = status()
    if st.backend == "reference":
        print(f"mondrian: warning: {SLOW_WARNING} ({st.reason})", file=stream or sys.stderr)
