import ctypes
import json
import platform

import pytest

from mondrian.core import blas
from tests.helpers import run_cli

linux = pytest.mark.skipif(platform.system() != "Linux", reason="the BLAS preload is Linux-only")


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


@linux
def test_sgemm_resolves_to_openblas_in_this_process():
    """libmlx.so binds cblas_sgemm through the global scope: it must be OpenBLAS's, not the
    reference BLAS bundled in the wheel."""
    st = blas.status()
    assert st.backend == "openblas", st
    import mlx.core as mx

    mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))
    libdl = ctypes.CDLL(None)
    addr = ctypes.cast(libdl.cblas_sgemm, ctypes.c_void_p)
    info = _DlInfo()
    assert libdl.dladdr(addr, ctypes.byref(info))
    assert info.dli_fname.decode() == st.path
    assert "mlx_cpu.libs" not in info.dli_fname.decode()


@linux
def test_disabled_blas_is_reported_and_warned():
    res = run_cli("info", "--json", env={"MONDRIAN_BLAS": "off"})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["blas"]["backend"] == "reference"
    assert "reference BLAS" in res.stderr and "warning" in res.stderr


@linux
def test_unloadable_blas_says_why():
    res = run_cli("info", "--json", env={"MONDRIAN_BLAS": "/nonexistent/libopenblas.so"})
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)["blas"]
    assert st["backend"] == "reference"
    assert "could not load" in st["reason"] and "/nonexistent/libopenblas.so" in st["reason"]
    assert "warning" in res.stderr


@linux
def test_default_cli_process_gets_openblas_without_warning():
    res = run_cli("info", "--json", env={"MONDRIAN_BLAS": ""})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["blas"]["backend"] == "openblas"
    assert "warning" not in res.stderr
