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


def pipeline_dataset(root: Path, advisor: str, **demo) -> Path:
    """The real data pipeline in small: demo workspace -> link -> dataset; returns the dataset."""
    from lora.dataset import build_dataset
    from lora.demo_workspace import write_demo_workspace
    from lora.link import link_workspace
    from mondrian.contracts import get_advisor
    from mondrian.workspace import load_workspace

    write_demo_workspace(root, **demo)
    ws = load_workspace(root)
    link_workspace(ws, progress=False)
    out = root / "datasets" / advisor
    build_dataset(root / "manifest", get_advisor(advisor), out, data_root=ws.data_path)
    return out
