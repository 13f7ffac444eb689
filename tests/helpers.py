"""Helpers shared by tests."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}


def run_cli(*args: str, env: dict | None = None, **kw):
    """Run the real `mondrian` console entry point in a fresh process."""
    import subprocess

    full_env = dict(os.environ) | (env or {})
    return subprocess.run([sys.executable, "-m", "mondrian.cli", *args], capture_output=True,
                          text=True, env=full_env, cwd=kw.pop("cwd", ROOT), **kw)


def pipeline_dataset(root: Path, advisor: str, retrieval: bool = False, **demo) -> Path:
    """The real data pipeline in small: demo workspace -> link -> dataset; returns the dataset.
    Rows carry retrieved examples only with `retrieval` (the tests of retrieval ask for them;
    for the others, prompts 2.4x as long would only make the suite slower)."""
    from dataclasses import replace

    from mondrian.core.contracts import get_advisor
    from mondrian.core.workspace import load_workspace
    from mondrian.dataset.build import build_dataset
    from mondrian.demo.workspace import write_demo_workspace
    from mondrian.link.linker import link_workspace

    write_demo_workspace(root, **demo)
    ws = load_workspace(root)
    link_workspace(ws, progress=False)
    out = root / "datasets" / advisor
    contract = get_advisor(advisor)
    build_dataset(root / "manifest", contract if retrieval else replace(contract, retrieval=None), out,
                  data_root=ws.data_path)
    return out


def write_random_adapter(folder: Path, base_path: str, seed: int = 0, num_layers: int = 2,
                         lora: dict | None = None, amplitude: float = 0.05) -> Path:
    """An mlx-lm LoRA adapter for `base_path` with random, non-zero lora_b (so it changes the
    model), written as mlx-lm writes it. Faster than training and just as real to a loader."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mondrian.core.adapters import write_adapter

    lora = lora or LORA
    model, _ = load(base_path)
    model.freeze()
    mx.random.seed(seed)
    linear_to_lora_layers(model, num_layers, lora)
    weights = {k: (mx.random.normal(v.shape) * amplitude if k.endswith("lora_b") else v)
               for k, v in tree_flatten(model.trainable_parameters())}
    folder.mkdir(parents=True, exist_ok=True)
    write_adapter(folder, weights, {"model": base_path, "fine_tune_type": "lora",
                                    "num_layers": num_layers, "lora_parameters": lora})
    return folder


class ServeProcess:
    """A real `mondrian serve` subprocess on 127.0.0.1 (any free port), for tests and benchmarks.
    `wait=False` returns once it is started; `ready()` then waits for its port. Text advisors
    decode freely unless `constrained` (most tests compare answers with free generation or
    need a random model's contract failures; test_service.py covers the grammar default)."""

    def __init__(self, tmp: Path, *args: str, name: str = "server", token: str | None = None,
                 wait: bool = True, timeout: float = 600, constrained: bool = False):
        import subprocess
        import time

        stamp = f"{name}-{time.monotonic_ns()}"
        self.ready_file, self.log, self.token, self.timeout = tmp / f"{stamp}.port", tmp / f"{stamp}.log", token, timeout
        cmd = [sys.executable, "-m", "mondrian.cli", "serve", "--port", "0", "--ready-file", str(self.ready_file),
               *([] if constrained or "--unconstrained" in args else ["--unconstrained"]), *args]
        env = {k: v for k, v in os.environ.items() if k != "MONDRIAN_ADMIN_TOKEN"}
        # the token goes by the environment, as --help advises: on the command line `ps` shows it
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     env=env | ({"MONDRIAN_ADMIN_TOKEN": token} if token else {}))
        if wait:
            self.ready()

    def ready(self) -> "ServeProcess":
        import time

        deadline = time.time() + self.timeout
        while not self.ready_file.exists() or not self.ready_file.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.ready_file.read_text()}"
        return self

    def call(self, method: str, path: str, body=None, token: str | None = None, raw: bytes | None = None,
             headers: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
        """(HTTP status, JSON body); 4xx/5xx are returned, not raised."""
        import json
        import urllib.error
        import urllib.request

        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 30 s; the exit code."""
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def write_random_vision_adapter(folder: Path, base_path: str, seed: int = 0, num_layers: int = 2, rank: int = 4,
                                scale: float = 10.0, amplitude: float = 0.2,
                                keys: list[str] | None = None) -> Path:
    """An mlx-vlm LoRA adapter folder for the vision model at `base_path`, with seeded random
    lora_a / lora_b (times `amplitude`), attached and written as mondrian/train/vision.py does
    (mlx-vlm's `prepare_model_for_training` on core.adapters' `lora_targets`, `save_vision_adapter`)."""
    import mlx.core as mx
    import mlx_vlm
    from mlx.utils import tree_flatten
    from mlx_vlm.trainer.common.model import prepare_model_for_training

    from mondrian.core.adapters import lora_targets
    from mondrian.train.vision import save_vision_adapter

    model, _ = mlx_vlm.load(base_path)
    prepare_model_for_training(model, train_type="lora", lora_rank=rank, lora_alpha=scale * rank,
                               lora_dropout=0.0, target_modules=list(lora_targets(model, num_layers, keys)),
                               verbose=False)
    mx.random.seed(seed)
    weights = [(k, mx.random.normal(v.shape) * amplitude) for k, v in tree_flatten(model.trainable_parameters())]
    model.load_weights(weights, strict=False)
    folder.mkdir(parents=True, exist_ok=True)
    save_vision_adapter(folder, model, {"base_model_path": base_path, "seed": seed, "random": True})
    return folder


def flip_production_while(server: ServeProcess, advisor: str, client, n: int, workers: int) -> tuple[list, list]:
    """Run client(0..n-1) on `workers` threads while another thread flips the advisor's
    production alias between v2 and v1 every 50 ms through the admin API (asserting each flip
    is accepted). Returns (the clients' results in order, the versions flipped to)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    stop, flips, errors = threading.Event(), [], []

    def flipper():
        i = 0
        while not stop.is_set():
            status, body = server.call("POST", f"/admin/advisors/{advisor}/activate", {"version": ("v2", "v1")[i % 2]},
                                       token=server.token)
            if status != 200:
                errors.append(body)
            flips.append(body.get("version"))
            i += 1
            time.sleep(0.05)

    t = threading.Thread(target=flipper)
    t.start()
    try:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(client, range(n)))
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    return results, flips
