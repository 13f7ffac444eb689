"""Adapter registry: immutable, checksummed versions of mlx-lm LoRA adapters, with moving aliases.

Layout (the root defaults to ./adapters, or $MONDRIAN_ADAPTERS):

    <root>/<advisor>/
        v1/, v2/, ...   a plain mlx-lm adapter folder (adapters.safetensors, adapter_config.json,
                        other top-level files of the source such as loss_curve.svg) plus
                        card.json; files 0444, folder 0555; never rewritten
        aliases.json    current aliases, the per-alias stack rollback pops, and a history log;
                        replaced atomically
        .lock           fcntl lock: one publish / alias change at a time per advisor
        .publish-*      a publish in progress, or one that was killed: ignored by every
                        reader and removed by the next publish

`mlx_lm generate --model <base> --adapter-path <root>/<advisor>/vN` works on any version:
mlx-lm reads its two files and ignores card.json.

Loaders (eval, the service) call `Registry.resolve`, which verifies every checksum and the
base-model fingerprint before it returns a folder. This module never imports `lora`: the
service side uses it too, and callers pass fingerprints in. mlx / mlx-lm are imported only
by `export_fused`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mondrian.core.atomic import atomic_folder

CARD = "card.json"
ALIASES = "aliases.json"
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
CARD_FORMAT = 1
TEMP_PREFIX = ".publish-"

VERSION_RE = re.compile(r"v([1-9][0-9]*)")
ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
ADVISOR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
# mlx_lm lora saves intermediate checkpoints beside the final file (0000100_adapters.safetensors):
# not part of the adapter, and they would multiply a version's size.
MLX_LM_CHECKPOINT_RE = re.compile(r"[0-9]+_adapters\.safetensors")

_CHUNK = 1 << 20
_SAFETENSORS_DTYPES = {"F32", "F16", "BF16"}


class RegistryError(ValueError):
    """A registry operation is refused; the message names the advisor, version and the problem."""


# --------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Card:
    """card.json: everything needed to trust and reproduce a version."""

    advisor: str
    version: str
    created_at: str
    base_model: str
    base_model_fingerprint: str
    dataset_fingerprint: str | None
    run_id: str | None
    config: dict
    metrics: dict
    files: dict[str, str]  # every file but card.json -> sha256
    parent: str | None
    source: str
    origin: str = "publish"  # "publish" (a mondrian training run) or "import" (plain mlx_lm lora)
    card_format: int = CARD_FORMAT
    card_sha256: str = ""  # over the rest of the card: catches a damaged card.json

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Version:
    advisor: str
    version: str
    path: Path
    card: Card | None  # None when card.json cannot be read (see `error`; `verify` says more)
    aliases: tuple[str, ...] = ()
    error: str | None = None

    @property
    def number(self) -> int:
        return int(self.version[1:])

    def to_dict(self) -> dict:
        return {"advisor": self.advisor, "version": self.version, "path": str(self.path),
                "aliases": list(self.aliases), "error": self.error,
                "card": self.card.to_dict() if self.card else None}


@dataclass
class VerifyReport:
    """Every file of a version checked against its card; any problem is a failure."""

    advisor: str
    version: str
    path: Path
    ok_files: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    changed: list[tuple[str, str, str]] = field(default_factory=list)  # (name, expected, found)
    extra: list[str] = field(default_factory=list)
    card_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.extra or self.card_errors)

    def problems(self) -> list[str]:
        out = list(self.card_errors)
        out += [f"{n} fails its checksum (card sha256 {e[:12]}, file {f[:12]})"
                if len(f) == 64 else f"{n}: {f}" for n, e, f in self.changed]
        out += [f"{n} is missing" for n in self.missing]
        out += [f"{n} is not in the card (extra file)" for n in self.extra]
        return out

    def describe(self) -> str:
        if self.ok:
            return f"{self.advisor} {self.version}: ok ({len(self.ok_files)} files match the card)"
        return f"{self.advisor} {self.version}: " + "; ".join(self.problems())

    def to_dict(self) -> dict:
        return {"advisor": self.advisor, "version": self.version, "path": str(self.path),
                "ok": self.ok, "ok_files": self.ok_files, "missing": self.missing,
                "changed": [{"file": n, "expected": e, "found": f} for n, e, f in self.changed],
                "extra": self.extra, "card_errors": self.card_errors}


# --------------------------------------------------------------------------------------------
# helpers


def default_root() -> Path:
    return Path(os.environ.get("MONDRIAN_ADAPTERS", "adapters"))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _card_digest(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "card_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_hashed(src: Path, dst: Path) -> str:
    """Copy and hash in one pass: the card's sha256 is of the bytes written, even if the
    source changes meanwhile. fsync so a power loss cannot leave a renamed-in empty file."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        while chunk := fi.read(_CHUNK):
            h.update(chunk)
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _force_rmtree(path: Path) -> None:
    """Remove a (possibly read-only) temp folder left by a killed publish."""
    for root, _dirs, _files in os.walk(path):
        try:
            os.chmod(root, 0o700)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


_libc = None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails if `dst` exists. Plain rename silently replaces an *empty*
    directory, so use renameat2(RENAME_NOREPLACE) / renamex_np(RENAME_EXCL) where available;
    elsewhere the advisor lock plus an existence check covers it."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    call = None
    if sys.platform.startswith("linux") and hasattr(_libc, "renameat2"):
        at_fdcwd, noreplace = -100, 1
        def call():
            return _libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace)
    elif sys.platform == "darwin" and hasattr(_libc, "renamex_np"):
        def call():
            return _libc.renamex_np(os.fsencode(src), os.fsencode(dst), 0x4)  # RENAME_EXCL
    if call is not None:
        if call() == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # flag unsupported: fall back
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def _safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file, checked against the file's size (a truncated
    or non-safetensors file is refused here, without loading any tensor)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise ValueError("not a safetensors file (header length beyond the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            start, stop = info["data_offsets"]
            shape, _ = info["shape"], info["dtype"]
            ok = 0 <= start <= stop and all(isinstance(d, int) and d >= 0 for d in shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"tensor {name}: malformed header entry") from exc
        if not ok:
            raise ValueError(f"tensor {name}: malformed header entry")
        end = max(end, stop)
    if 8 + n + end != size:
        raise ValueError(f"truncated or padded: the header describes {8 + n + end} bytes, "
                         f"the file has {size}")
    return header


def check_adapter(folder: str | Path) -> dict:
    """Check that `folder` is an mlx-lm LoRA/DoRA adapter folder; return its adapter_config.

    What `mlx_lm.load(..., adapter_path=)` needs and would otherwise fail on late (or, for
    tensors, on the wrong model, not at all): both files, the config keys
    `linear_to_lora_layers` reads, a readable safetensors file of paired lora_a / lora_b
    tensors whose rank is the config's.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RegistryError(f"{folder}: not a folder")
    missing = [n for n in ADAPTER_FILES if not (folder / n).is_file()]
    if missing:
        raise RegistryError(f"{folder}: not an mlx-lm adapter folder: {', '.join(missing)} missing")
    problems: list[str] = []
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{folder}: adapter_config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise RegistryError(f"{folder}: adapter_config.json is not a JSON object")
    ftype = config.get("fine_tune_type")
    if ftype is None:
        problems.append("adapter_config.json has no fine_tune_type")
    elif ftype not in ("lora", "dora"):
        problems.append(f"fine_tune_type '{ftype}' is not an adapter (lora or dora)")
    num_layers = config.get("num_layers")
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        problems.append("adapter_config.json needs an integer num_layers")
    params = config.get("lora_parameters")
    rank = None
    if not isinstance(params, dict):
        problems.append("adapter_config.json needs lora_parameters {rank, scale, dropout}")
    else:
        for key in ("rank", "scale", "dropout"):
            if not isinstance(params.get(key), int | float) or isinstance(params.get(key), bool):
                problems.append(f"lora_parameters.{key} is missing or not a number")
        if isinstance(params.get("rank"), int) and params["rank"] > 0:
            rank = params["rank"]
        elif "rank" in params:
            problems.append("lora_parameters.rank must be a positive integer")
    try:
        header = _safetensors_header(folder / "adapters.safetensors")
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{folder}: adapters.safetensors: {exc}"
                            + (f"; also {'; '.join(problems)}" if problems else "")) from exc
    if not header:
        problems.append("adapters.safetensors holds no tensors")
    allowed = ("lora_a", "lora_b", "m") if ftype == "dora" else ("lora_a", "lora_b")
    foreign = sorted(n for n in header if n.rsplit(".", 1)[-1] not in allowed)
    if foreign:
        problems.append(f"adapters.safetensors holds tensors that are not adapter weights "
                        f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''})")
    bad_dtype = sorted(n for n, t in header.items() if t["dtype"] not in _SAFETENSORS_DTYPES)
    if bad_dtype:
        problems.append(f"non-float adapter tensors ({', '.join(bad_dtype[:3])})")
    for name in sorted(n for n in header if n.endswith(".lora_a")):
        b_name = name[:-1] + "b"
        a_shape = header[name]["shape"]
        b_shape = header.get(b_name, {}).get("shape")
        if b_shape is None:
            problems.append(f"{name} has no {b_name}")
        elif len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
            problems.append(f"{name} {a_shape} and {b_name} {b_shape} do not pair")
        elif rank is not None and a_shape[1] != rank:
            problems.append(f"{name} has rank {a_shape[1]}, the config says {rank}")
    orphans = sorted(n for n in header if n.endswith(".lora_b") and n[:-1] + "a" not in header)
    if orphans:
        problems.append(f"{orphans[0]} has no lora_a")
    layers = {m.group(1) for n in header if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", n))}
    if isinstance(num_layers, int) and num_layers > 0 and len(layers) > num_layers:
        problems.append(f"tensors for {len(layers)} layers but num_layers is {num_layers}")
    if problems:
        raise RegistryError(f"{folder}: not a usable mlx-lm adapter: " + "; ".join(problems))
    return config


def run_fields(run: dict) -> dict:
    """`publish` keyword arguments from a `runs` row (mondrian.train.runs.RunStore.get)."""
    if run.get("status") not in ("completed", "interrupted"):
        raise RegistryError(f"run {run.get('run_id')} is {run.get('status')}: only a finished run "
                            "can be published")
    return {"base_model": run["base_model"], "base_model_fingerprint": run["base_model_fingerprint"],
            "dataset_fingerprint": run.get("dataset_fingerprint"), "run_id": run["run_id"],
            "config": run.get("config") or None}


# --------------------------------------------------------------------------------------------
# the registry


class Registry:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    # ---- names and paths

    def _advisor_dir(self, advisor: str) -> Path:
        if not isinstance(advisor, str) or not ADVISOR_RE.fullmatch(advisor):
            raise RegistryError(f"advisor name {advisor!r} must be letters, digits, '.', '_' or '-'")
        return self.root / advisor

    @staticmethod
    def _check_alias_name(alias: str) -> None:
        if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias) or VERSION_RE.fullmatch(alias):
            raise RegistryError(f"alias {alias!r}: aliases are lower-case names like 'production' "
                                "([a-z][a-z0-9_-]*) and never look like a version (v<number>)")

    @contextmanager
    def _lock(self, advisor: str) -> Iterator[Path]:
        """Serialize writers of one advisor (publish, aliases) across processes and threads
        (flock is per open file, so threads each opening it exclude each other too)."""
        adir = self._advisor_dir(advisor)
        adir.mkdir(parents=True, exist_ok=True)
        with open(adir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield adir
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _version_dirs(self, adir: Path) -> list[Path]:
        if not adir.is_dir():
            return []
        found = [p for p in adir.iterdir() if VERSION_RE.fullmatch(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(p.name[1:]))

    # ---- aliases.json

    def _read_state(self, adir: Path) -> dict:
        path = adir / ALIASES
        if not path.is_file():
            return {"aliases": {}, "previous": {}, "history": []}
        try:
            state = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{path}: damaged ({exc}); restore it or set the aliases again") from exc
        if not isinstance(state, dict) or not isinstance(state.get("aliases"), dict):
            raise RegistryError(f"{path}: damaged (not an alias file); restore it or set the aliases again")
        state.setdefault("previous", {})
        state.setdefault("history", [])
        return state

    def _ref_to_version(self, advisor: str, ref: str, state: dict | None = None) -> str:
        """A version name (`v3`) or an alias (`production`) -> the version name."""
        if isinstance(ref, str) and VERSION_RE.fullmatch(ref):
            return ref
        adir = self._advisor_dir(advisor)
        state = state if state is not None else self._read_state(adir)
        if ref in state["aliases"]:
            return state["aliases"][ref]
        known = ", ".join(sorted(state["aliases"])) or "none set"
        raise RegistryError(f"{advisor}: '{ref}' is neither a version (v1, v2, ...) nor an alias "
                            f"(aliases: {known})")

    def _require_version(self, advisor: str, version: str) -> Path:
        adir = self._advisor_dir(advisor)
        path = adir / version
        if not path.is_dir():
            have = ", ".join(p.name for p in self._version_dirs(adir)) or "none"
            raise RegistryError(f"{advisor} {version}: no such version (published: {have})")
        return path

    # ---- reading

    def _read_card(self, path: Path) -> Card:
        try:
            data = json.loads((path / CARD).read_text())
            card = Card(**data)
        except FileNotFoundError as exc:
            raise RegistryError(f"{CARD} is missing") from exc
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise RegistryError(f"{CARD} is unreadable ({type(exc).__name__}: {exc})") from exc
        if _card_digest(data) != card.card_sha256:
            raise RegistryError(f"{CARD} was changed after publishing (its own checksum fails)")
        return card

    def _version_record(self, advisor: str, path: Path, state: dict) -> Version:
        aliases = tuple(sorted(a for a, v in state["aliases"].items() if v == path.name))
        try:
            card, error = self._read_card(path), None
        except RegistryError as exc:
            card, error = None, str(exc)
        return Version(advisor, path.name, path, card, aliases, error)

    def advisors(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and ADVISOR_RE.fullmatch(p.name) and self._version_dirs(p))

    def list(self, advisor: str | None = None) -> list[Version]:
        """Published versions (of one advisor, or all), oldest first; hidden temp folders of
        publishes in progress or killed are not versions."""
        out = []
        for name in [advisor] if advisor else self.advisors():
            adir = self._advisor_dir(name)
            state = self._read_state(adir)
            out += [self._version_record(name, p, state) for p in self._version_dirs(adir)]
        return out

    def show(self, advisor: str, version_or_alias: str) -> Version:
        adir = self._advisor_dir(advisor)
        state = self._read_state(adir)
        version = self._ref_to_version(advisor, version_or_alias, state)
        return self._version_record(advisor, self._require_version(advisor, version), state)

    def aliases(self, advisor: str) -> dict[str, str]:
        return dict(self._read_state(self._advisor_dir(advisor))["aliases"])

    def alias_history(self, advisor: str) -> list[dict]:
        return list(self._read_state(self._advisor_dir(advisor))["history"])

    def verify(self, advisor: str, version_or_alias: str) -> VerifyReport:
        """Check every file of a version against its card: missing, changed and extra files,
        and the card itself (its own checksum, and that it belongs in this folder)."""
        version = self._ref_to_version(advisor, version_or_alias)
        path = self._require_version(advisor, version)
        report = VerifyReport(advisor, version, path)
        try:
            card = self._read_card(path)
        except RegistryError as exc:
            report.card_errors.append(str(exc))
            return report
        if (card.advisor, card.version) != (advisor, version):
            report.card_errors.append(f"{CARD} is for {card.advisor} {card.version}: the folder "
                                      "was copied or renamed")
        for name in ADAPTER_FILES:
            if name not in card.files:
                report.card_errors.append(f"{CARD} lists no {name}")
        present = {p.name for p in path.iterdir()} - {CARD}
        for name, expected in sorted(card.files.items()):
            file = path / name
            if name not in present:
                report.missing.append(name)
                continue
            mode = file.lstat().st_mode
            if not stat.S_ISREG(mode):
                report.changed.append((name, expected, "not a regular file any more"))
                continue
            found = _sha256(file)
            if found == expected:
                report.ok_files.append(name)
            else:
                report.changed.append((name, expected, found))
        report.extra = sorted(present - set(card.files))
        return report

    def resolve(self, advisor: str, version_or_alias: str,
                base_model_fingerprint: str | None = None) -> Path:
        """The folder to load, after every checksum passes and (when given) the base model's
        fingerprint matches the card's. What every loader calls."""
        report = self.verify(advisor, version_or_alias)
        if not report.ok:
            raise RegistryError(f"refused to load {advisor} {report.version}: "
                                + "; ".join(report.problems()))
        card = self._read_card(report.path)
        if base_model_fingerprint is not None and base_model_fingerprint != card.base_model_fingerprint:
            raise RegistryError(
                f"refused to load {advisor} {report.version}: it was trained on {card.base_model} "
                f"(base-model fingerprint {card.base_model_fingerprint[:12]}), but the base model "
                f"given has fingerprint {base_model_fingerprint[:12]}")
        return report.path

    # ---- writing

    def publish(self, source_dir: str | Path, advisor: str, *, base_model: str,
                base_model_fingerprint: str, dataset_fingerprint: str | None = None,
                run_id: str | None = None, config: dict | None = None,
                metrics: dict | None = None, parent: str | None = None,
                extra_files: dict[str, str | Path] | None = None,
                _origin: str = "publish") -> Version:
        """Copy an adapter folder into the advisor's next version, atomically.

        Copied: the top-level files of `source_dir` (not checkpoints/, best/, last/, hidden
        files, mlx-lm's NNN_adapters.safetensors checkpoints, or a card.json), plus
        `extra_files` (name in the version -> file; e.g. the evaluation report), all under the
        card's checksums. `config` defaults to the adapter_config.json; `parent` to what
        `production` points at now.
        """
        src = Path(source_dir)
        if not isinstance(base_model_fingerprint, str) or not FINGERPRINT_RE.fullmatch(base_model_fingerprint):
            raise RegistryError(f"base_model_fingerprint {base_model_fingerprint!r} is not a sha256 "
                                "(pass the base model's fingerprint, e.g. mondrian.models.sources.resolve(spec).fingerprint)")
        adapter_config = check_adapter(src)
        try:
            metrics = json.loads(json.dumps(metrics or {}, allow_nan=False))
            config = json.loads(json.dumps(config if config is not None else adapter_config,
                                           allow_nan=False, default=str))
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"metrics / config must be JSON (finite numbers): {exc}") from exc
        sources = {p.name: p for p in sorted(src.iterdir())
                   if p.is_file() and not p.name.startswith(".") and p.name != CARD
                   and not MLX_LM_CHECKPOINT_RE.fullmatch(p.name)}
        for name, path in (extra_files or {}).items():
            if "/" in name or name.startswith(".") or name == CARD or name in sources:
                raise RegistryError(f"extra file name {name!r} is not a plain new file name in the version")
            if not Path(path).is_file():
                raise RegistryError(f"extra file {path}: no such file")
            sources[name] = Path(path)

        with self._lock(advisor) as adir:
            for old in adir.glob(TEMP_PREFIX + "*"):
                _force_rmtree(old)  # we hold the lock: whoever made it is dead
            state = self._read_state(adir)
            # A number is never reused, even if a version folder was deleted by hand.
            used = {int(p.name[1:]) for p in adir.iterdir() if VERSION_RE.fullmatch(p.name)}
            used |= {int(v[1:]) for v in self._versions_named(state)}
            version = f"v{max(used, default=0) + 1}"
            if parent is None:
                parent = state["aliases"].get("production")
            else:
                parent = self._ref_to_version(advisor, parent, state)
                self._require_version(advisor, parent)
            tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{version}-", dir=adir))
            try:
                files = {name: _copy_hashed(p, tmp / name) for name, p in sorted(sources.items())}
                check_adapter(tmp)  # what was copied is what was checked
                data = Card(advisor=advisor, version=version, created_at=_now(), base_model=base_model,
                            base_model_fingerprint=base_model_fingerprint,
                            dataset_fingerprint=dataset_fingerprint, run_id=run_id, config=config,
                            metrics=metrics, files=files, parent=parent, source=str(src.resolve()),
                            origin=_origin).to_dict()
                data["card_sha256"] = _card_digest(data)
                with open(tmp / CARD, "x") as f:
                    f.write(json.dumps(data, indent=2) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                for p in tmp.iterdir():
                    p.chmod(0o444)
                _fsync_dir(tmp)
                tmp.chmod(0o555)  # no file can be added, removed or renamed inside
                try:
                    _rename_noreplace(tmp, adir / version)  # the one step that makes it visible
                except FileExistsError as exc:  # only a writer that ignores the lock gets here
                    raise RegistryError(f"{advisor} {version}: appeared while publishing; "
                                        "nothing was overwritten, publish again") from exc
            except BaseException:
                _force_rmtree(tmp)
                raise
            _fsync_dir(adir)
        return self.show(advisor, version)

    def publish_run(self, run: dict, advisor: str | None = None, *, metrics: dict | None = None,
                    parent: str | None = None, extra_files: dict[str, str | Path] | None = None) -> Version:
        """Publish a training run's adapter (its runs row: adapter_path, fingerprints, config)."""
        advisor = advisor or run.get("advisor")
        if not advisor:
            raise RegistryError(f"run {run.get('run_id')} has no advisor: name one")
        if not run.get("adapter_path"):
            raise RegistryError(f"run {run.get('run_id')} has no adapter_path")
        return self.publish(run["adapter_path"], advisor, metrics=metrics, parent=parent,
                            extra_files=extra_files, **run_fields(run))

    def import_adapter(self, source_dir: str | Path, advisor: str, *, base_model: str,
                       base_model_fingerprint: str, dataset_fingerprint: str | None = None,
                       run_id: str | None = None, config: dict | None = None,
                       metrics: dict | None = None, parent: str | None = None) -> Version:
        """Publish an adapter trained by plain `python -m mlx_lm lora` (adapters.safetensors +
        adapter_config.json, maybe its NNN_adapters.safetensors checkpoints, which are left
        out). Validated by `check_adapter` as every publish is; the card records origin "import"."""
        return self.publish(source_dir, advisor, base_model=base_model,
                            base_model_fingerprint=base_model_fingerprint,
                            dataset_fingerprint=dataset_fingerprint, run_id=run_id, config=config,
                            metrics=metrics, parent=parent, _origin="import")

    @staticmethod
    def _versions_named(state: dict) -> set[str]:
        names = set(state["aliases"].values())
        for stack in state["previous"].values():
            names |= set(stack)
        for entry in state["history"]:
            names |= {v for v in (entry.get("from"), entry.get("to")) if v}
        return {v for v in names if isinstance(v, str) and VERSION_RE.fullmatch(v)}

    def _move_alias(self, advisor: str, alias: str, target: str | None, action: str) -> str:
        self._check_alias_name(alias)
        with self._lock(advisor) as adir:
            state = self._read_state(adir)
            current = state["aliases"].get(alias)
            stack = state["previous"].setdefault(alias, [])
            if action == "rollback":
                target = self._rollback_target(advisor, alias, state)
            self._require_version(advisor, target)
            report = self.verify(advisor, target)
            if not report.ok:  # never point an alias at a damaged version
                raise RegistryError(f"refused to point {advisor} '{alias}' at {target}: "
                                    + "; ".join(report.problems()))
            if target == current:
                return target
            if action == "rollback":
                stack.pop()
            elif current is not None:
                stack.append(current)
            state["aliases"][alias] = target
            state["history"].append({"at": _now(), "alias": alias, "action": action,
                                     "from": current, "to": target})
            _write_json_atomic(adir / ALIASES, state)
            return target

    @staticmethod
    def _rollback_target(advisor: str, alias: str, state: dict) -> str:
        current = state["aliases"].get(alias)
        stack = state["previous"].setdefault(alias, [])
        while stack and stack[-1] == current:
            stack.pop()  # not a move: skip
        if not stack:
            raise RegistryError(f"{advisor}: alias '{alias}' has no earlier version to roll "
                                f"back to (it points at {current or 'nothing'})")
        return stack[-1]

    def rollback_target(self, advisor: str, alias: str = "production") -> str:
        """The version `rollback` would point `alias` at (nothing moves)."""
        self._check_alias_name(alias)
        return self._rollback_target(advisor, alias, self._read_state(self._advisor_dir(advisor)))

    def set_alias(self, advisor: str, alias: str, version: str) -> str:
        """Point `alias` at `version` (verified first); the old target is kept for rollback."""
        if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
            raise RegistryError(f"{advisor}: '{version}' is not a version name (v1, v2, ...)")
        return self._move_alias(advisor, alias, version, "set")

    def rollback(self, advisor: str, alias: str = "production") -> str:
        """Move `alias` back to the version it pointed at before its last move; returns it."""
        return self._move_alias(advisor, alias, None, "rollback")

    # ---- export

    def export_fused(self, advisor: str, version_or_alias: str, base_model_path: str | Path,
                     out_dir: str | Path, *, base_model_fingerprint: str,
                     dequantize: bool = False, overwrite: bool = False) -> Path:
        """Fuse a verified version into its base model with mlx-lm's own fuse code; write an
        mlx-lm model folder that `mlx_lm.load` loads (atomically, with mondrian_export.json).

        A quantized base stays quantized unless `dequantize`: the fused weights are then
        re-quantized, so outputs differ slightly from base + adapter."""
        adapter = self.resolve(advisor, version_or_alias, base_model_fingerprint)
        version = adapter.name
        base = Path(base_model_path)
        if not (base / "config.json").is_file():
            # mlx_lm.load treats a path that does not exist as a hub repo id.
            raise RegistryError(f"{base}: not a local model folder (no config.json)")
        out = Path(out_dir)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise RegistryError(f"{out} already exists: pick another folder or pass overwrite")

        from mlx.utils import tree_unflatten
        from mlx_lm.utils import dequantize_model, load, save

        model, tokenizer, config = load(str(base), adapter_path=str(adapter), return_config=True)
        fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules()
                 if hasattr(m, "fuse")]  # as mlx_lm/fuse.py main()
        if not fused:
            raise RegistryError(f"{advisor} {version}: no LoRA layers to fuse")
        model.update_modules(tree_unflatten(fused))
        if dequantize:
            model = dequantize_model(model)
            config.pop("quantization", None)
            config.pop("quantization_config", None)
        card = self._read_card(adapter)
        with atomic_folder(out) as tmp:
            save(tmp, str(base), model, tokenizer, config, donate_model=False)
            (tmp / "mondrian_export.json").write_text(json.dumps({
                "advisor": advisor, "version": version, "adapter_card_sha256": card.card_sha256,
                "base_model": card.base_model, "base_model_fingerprint": card.base_model_fingerprint,
                "base_model_path": str(base.resolve()), "dequantized": dequantize,
                "created_at": _now()}, indent=2) + "\n")
        return out
