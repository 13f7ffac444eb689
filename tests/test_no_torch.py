"""mondrian is PyTorch-free: importing every module and running the commands never imports torch.

torch is not installed here, so checking sys.modules could never fail. Instead a
`sitecustomize` puts a watcher first on sys.meta_path: every `import torch` (or
`torch.*`) statement that executes is recorded with its stack, then fails as it would
on a machine without torch. Availability probes (`importlib.util.find_spec`, which
transformers uses) are not imports and are not recorded.
"""

import os
import pkgutil
import subprocess
import sys

import pytest

import mondrian
from tests.helpers import run_cli

WATCHER = '''
import os, sys, traceback
class _TorchWatch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            stack = traceback.extract_stack()
            probe = any(f.name == "find_spec" and "importlib" in f.filename and "util" in f.filename
                        for f in stack)
            if not probe:
                with open(os.environ["TORCH_MARKER"], "a") as fh:
                    fh.write("".join(traceback.format_list(stack[:-1])) + "\\n")
        return None
sys.meta_path.insert(0, _TorchWatch())
'''


@pytest.fixture
def watched(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(WATCHER)
    marker = tmp_path / "torch-imports.txt"
    return {"PYTHONPATH": str(site), "TORCH_MARKER": str(marker)}, marker


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ) | env,
                          capture_output=True, text=True)


def test_watcher_catches_an_import(watched):
    env, marker = watched
    _python("try:\n    import torch\nexcept ImportError:\n    pass\n", env)
    assert marker.exists()


def test_watcher_ignores_availability_probes(watched):
    env, marker = watched
    res = _python("import importlib.util; assert importlib.util.find_spec('torch') is None", env)
    assert res.returncode == 0, res.stderr
    assert not marker.exists()


def _modules() -> list[str]:
    names = []
    for pkg in (mondrian,):
        names.append(pkg.__name__)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return names


def test_importing_every_module_never_imports_torch(watched):
    env, marker = watched
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in _modules())
    # What our modules import lazily: the peers' model, training and generation code.
    code += "import mlx_lm, mlx_vlm, mlx_lm.tuner.trainer, mlx_lm.tuner.utils, mlx_vlm.trainer\n"
    res = _python(code, env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not marker.exists(), marker.read_text()[-3000:]


COMMANDS = [
    ["--help"], ["info", "--json"], ["models", "list", "--json"],
    ["models", "show", "tiny:llama", "--json"], ["models", "import", "tiny:qwen2-vl", "--json"],
    ["generate", "--model", "tiny:llama", "--prompt", "hello", "--max-tokens", "4"],
    ["demo", "--model", "tiny:qwen2", "--workspace", "{tmp}/ws", "--root", "{tmp}/adapters", "--iters", "2",
     "--eval-limit", "3", "--requests", "4", "--max-seq-length", "1024"],
    ["demo-data", "{tmp}/ws2", "--n-fit", "200", "--n-photo", "50", "--image-size", "48"],
    ["link", "-w", "{tmp}/ws2"],
    ["dataset", "-w", "{tmp}/ws2", "--advisor", "photo-critic", "--model", "tiny:qwen2-vl"],
    ["train", "--config", "{tmp}/train.yaml", "--no-progress"],
    ["runs", "list", "--db", "{tmp}/ws/mondrian.db"],
    ["harvest", "-w", "{tmp}/ws", "--json"],
    ["ab", "report", "--db", "{tmp}/ws/mondrian.db"],
]
TRAIN_YAML = """model: tiny:llama
data: {tmp}/ws/datasets/fit-query
adapter_path: {tmp}/run
num_layers: 2
batch_size: 4
iters: 2
mask_prompt: true
max_seq_length: 1024
val_batches: 1
"""


def test_commands_never_import_torch(watched, tmp_path):
    """Every command, in order (later ones use the workspace earlier ones wrote)."""
    env, marker = watched
    (tmp_path / "train.yaml").write_text(TRAIN_YAML.replace("{tmp}", str(tmp_path)))
    for args in COMMANDS:
        args = [a.replace("{tmp}", str(tmp_path)) for a in args]
        res = run_cli(*args, env=env)
        assert res.returncode == 0, (args, res.stderr[-2000:])
        assert not marker.exists(), (args, marker.read_text()[-3000:])
