"""Helpers shared by tests."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict | None = None, **kw):
    """Run the real `mondrian` console entry point in a fresh process."""
    import subprocess

    full_env = dict(os.environ) | (env or {})
    return subprocess.run([sys.executable, "-m", "mondrian.cli", *args], capture_output=True,
                          text=True, env=full_env, cwd=kw.pop("cwd", ROOT), **kw)
