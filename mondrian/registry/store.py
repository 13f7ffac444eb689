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
mlx-lm reads its two files and ignores card.json. A version trained with retrieval also holds
the run's retrieval_index.json (its sha256 is the card's `retrieval_index`); `reindex`
publishes the same weights with a newer index as the next version. A version trained on a
dataset built since prompts were pinned holds its prompt.json (system prompt and input settings,
`mondrian.core.contracts`), under the card's checksums like every file.

Loaders (eval, the service) call `Registry.resolve`, which verifies every checksum and the
base-model fingerprint before it returns a folder. This module never imports `lora`: the
service side uses it too, and callers pass fingerprints in. mlx / mlx-lm are imported only
by `mondrian.registry.fuse`.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mondrian.core.adapters import FILES as ADAPTER_FILES
from mondrian.core.adapters import AdapterError, check_adapter
from mondrian.core.atomic import fsync_dir, write_text_atomic
from mondrian.core.config import ConfigError
from mondrian.core.contracts import PROMPT_FILE, read_prompt
from mondrian.core.fingerprint import file_sha256
from mondrian.core.retrieval import INDEX_FILE, RetrievalError, RetrievalIndex
from mondrian.registry.files import copy_hashed, force_rmtree, rename_noreplace
from mondrian.registry.records import (
    ADVISOR_RE,
    ALIAS_RE,
    ALIASES,
    CARD,
    FINGERPRINT_RE,
    MLX_LM_CHECKPOINT_RE,
    TEMP_PREFIX,
    VERSION_RE,
    Card,
    RegistryError,
    VerifyReport,
    Version,
    card_digest,
    default_root,
    now,
    run_fields,
)


def _check_prompt(src: Path, advisor: str) -> None:
    """A pinned prompt (prompt.json) must be readable and the advisor's: the service asks the
    version with it."""
    try:
        pinned = read_prompt(src)
    except ConfigError as exc:
        raise RegistryError(str(exc)) from None
    if pinned is not None and pinned["advisor"] != advisor:
        raise RegistryError(f"{src / PROMPT_FILE}: the prompt is advisor {pinned['advisor']!r}'s; "
                            f"this version would be {advisor!r}'s")


def _check_adapter(folder: str | Path) -> dict:
    """core.adapters.check_adapter, refusing as the registry does (RegistryError)."""
    try:
        return check_adapter(folder)
    except AdapterError as exc:
        raise RegistryError(str(exc)) from exc


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

    def read_card(self, path: Path) -> Card:
        try:
            data = json.loads((path / CARD).read_text())
            card = Card(**data)
        except FileNotFoundError as exc:
            raise RegistryError(f"{CARD} is missing") from exc
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise RegistryError(f"{CARD} is unreadable ({type(exc).__name__}: {exc})") from exc
        if card_digest(data) != card.card_sha256:
            raise RegistryError(f"{CARD} was changed after publishing (its own checksum fails)")
        return card

    def _version_record(self, advisor: str, path: Path, state: dict) -> Version:
        aliases = tuple(sorted(a for a, v in state["aliases"].items() if v == path.name))
        try:
            card, error = self.read_card(path), None
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
            card = self.read_card(path)
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
            found = file_sha256(file)
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
        card = self.read_card(report.path)
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
        adapter_config = _check_adapter(src)
        _check_prompt(src, advisor)
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
                force_rmtree(old)  # we hold the lock: whoever made it is dead
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
                files = {name: copy_hashed(p, tmp / name) for name, p in sorted(sources.items())}
                _check_adapter(tmp)  # what was copied is what was checked
                data = Card(advisor=advisor, version=version, created_at=now(), base_model=base_model,
                            base_model_fingerprint=base_model_fingerprint,
                            dataset_fingerprint=dataset_fingerprint, run_id=run_id, config=config,
                            metrics=metrics, files=files, parent=parent, source=str(src.resolve()),
                            origin=_origin, retrieval_index=files.get(INDEX_FILE)).to_dict()
                data["card_sha256"] = card_digest(data)
                with open(tmp / CARD, "x") as f:
                    f.write(json.dumps(data, indent=2) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                for p in tmp.iterdir():
                    p.chmod(0o444)
                fsync_dir(tmp)
                tmp.chmod(0o555)  # no file can be added, removed or renamed inside
                try:
                    rename_noreplace(tmp, adir / version)  # the one step that makes it visible
                except FileExistsError as exc:  # only a writer that ignores the lock gets here
                    raise RegistryError(f"{advisor} {version}: appeared while publishing; "
                                        "nothing was overwritten, publish again") from exc
            except BaseException:
                force_rmtree(tmp)
                raise
            fsync_dir(adir)
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
        out). Validated by `core.adapters.check_adapter` as every publish is; the card records origin "import"."""
        return self.publish(source_dir, advisor, base_model=base_model,
                            base_model_fingerprint=base_model_fingerprint,
                            dataset_fingerprint=dataset_fingerprint, run_id=run_id, config=config,
                            metrics=metrics, parent=parent, _origin="import")

    def reindex(self, advisor: str, ref: str, index_file: str | Path) -> Version:
        """Publish `ref`'s weights again with a newer retrieval index (e.g. the dataset's after
        new jobs were linked), as the next version: no retraining. The index must be of the
        same kind (method, k) as the one the version was trained with; a version trained
        without retrieval is refused (its prompts never showed examples)."""
        source = self.show(advisor, ref)
        path = self.resolve(advisor, source.version)  # every checksum checked first
        if not (path / INDEX_FILE).is_file():
            raise RegistryError(f"{advisor} {source.version} was trained without retrieval: an index "
                                "cannot be added to it (train with the advisor's `retrieval:` instead)")
        try:
            old, new = RetrievalIndex.load(path / INDEX_FILE), RetrievalIndex.load(index_file)
        except RetrievalError as exc:
            raise RegistryError(str(exc)) from None
        if (new.method, new.k) != (old.method, old.k):
            raise RegistryError(f"{index_file}: method {new.method} k={new.k}, but {advisor} {source.version} "
                                f"was trained with {old.method} k={old.k}")
        card = source.card
        assert card is not None  # resolve() verified it
        with tempfile.TemporaryDirectory(prefix="mondrian-reindex-") as tmp:
            for name in card.files:
                if name != INDEX_FILE:
                    (Path(tmp) / name).write_bytes((path / name).read_bytes())
            (Path(tmp) / INDEX_FILE).write_bytes(Path(index_file).read_bytes())
            return self.publish(tmp, advisor, base_model=card.base_model,
                                base_model_fingerprint=card.base_model_fingerprint,
                                dataset_fingerprint=card.dataset_fingerprint, run_id=card.run_id,
                                config=card.config, parent=source.version, _origin="reindex")

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
            state["history"].append({"at": now(), "alias": alias, "action": action,
                                     "from": current, "to": target})
            write_text_atomic(adir / ALIASES, json.dumps(state, indent=2) + "\n", durable=True)
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
