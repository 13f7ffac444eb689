"""Advisor contracts: name, input kind, system prompt and the JSON Schema every answer meets.

The shipped advisors live in `mondrian/advisors/*.yaml`; a user adds one by dropping a
YAML file of the same shape into a workspace's advisors folder: no code needed. An optional
`cases` list gives the advisor's critical cases (an input and the output fields it must get
exactly right), which every evaluation runs. An optional `retrieval: {k: N}` makes its prompts
carry the N nearest solved training examples (`mondrian.core.retrieval`). An optional
`input_case: lower` shows the model every typed input lower-cased (see `Advisor.messages`);
`input_units`, `input_spelling` and `input_synonyms` show its amounts in one unit, its misspelt
words mended and its phrases as canonical words (`mondrian.core.rewrite`).

How the model is asked (the system prompt and the input settings) is pinned: `mondrian dataset` writes
it beside the rows (`prompt.json`), training copies it into the adapter and publishing into
the version, and evaluation and the service ask each version with its own (`Advisor.asked_as`),
as they do with its retrieval index. Editing the YAML then changes what new datasets teach,
not how versions already published are asked.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import jsonschema

from mondrian.core.config import ConfigError, from_dict, load_yaml
from mondrian.core.rewrite import Speller, Synonyms, Units, show

BUILTIN_DIR = Path(__file__).parents[1] / "advisors"
INPUT_KINDS = ("text", "image")
INPUT_CASES = ("as_typed", "lower")
PROMPT_FILE = "prompt.json"  # a dataset's, adapter's or version's pinned prompt settings
PROMPT_KEYS = ("advisor", "system_prompt", "input_case")
PROMPT_OPTIONAL = ("input_units", "input_spelling", "input_synonyms")  # absent from files pinned before they existed: off
_DEFAULTS = {"input_case": "as_typed", "input_units": None, "input_spelling": False, "input_synonyms": None}


@dataclass(frozen=True)
class Violation:
    path: str  # JSON path of the failing field, e.g. "$.capacity_min_kw"
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Case:
    """A critical case: `input` (the question) must get every field of `expect` exactly;
    fields it does not name are not checked (contract compliance still is)."""

    name: str
    input: str
    expect: dict


# `-shown`: questions compared as the advisor shows them to the model, not as typed
RETRIEVAL_METHODS = ("cover", "nearest", "cover-shown", "nearest-shown")


@dataclass(frozen=True)
class Retrieval:
    """The advisor YAML's `retrieval:` block: how many solved examples each prompt shows, and
    how they are chosen (`cover`: the k that together cover the question best; `nearest`: the
    k most similar; mondrian.core.retrieval)."""

    k: int = 4
    method: str = "cover"


@dataclass(frozen=True)
class Advisor:
    name: str
    input_kind: str
    system_prompt: str
    schema: dict
    source: str = ""
    cases: tuple[Case, ...] = ()  # evaluation only: not part of the fingerprint
    # "lower": prompts show typed inputs lower-cased (messages); part of the fingerprint
    input_case: str = "as_typed"
    # amounts shown in one unit; misspelt words mended from the index's (mondrian.core.rewrite);
    # both part of the fingerprint, as input_case
    input_units: Units | None = None
    input_spelling: bool = False
    input_synonyms: Synonyms | None = None
    # How prompts are built, not what an answer is: not part of the fingerprint either (the
    # index a version uses travels with the version, see mondrian.core.retrieval).
    retrieval: Retrieval | None = None
    _validator: jsonschema.protocols.Validator = field(default=None, repr=False, compare=False)

    @property
    def fields(self) -> list[str]:
        """Output fields in the order the schema lists them: the order answers are written in."""
        return list(self.schema.get("properties", {}))

    @cached_property
    def fingerprint(self) -> str:
        # Cases are left out: adding a test case must not change the identity of the contract
        # (manifests and datasets are keyed by this fingerprint).
        # input_case and the rewrites change the text a model is taught on, so they are part of
        # the identity; left out at their defaults so that contracts without them keep theirs.
        extra = {k: v for k, v in self.prompt_settings().items()
                 if k in ("input_case", *PROMPT_OPTIONAL) and v != _DEFAULTS[k]}
        body = json.dumps({"name": self.name, "input_kind": self.input_kind,
                           "system_prompt": self.system_prompt, "schema": self.schema, **extra},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()

    def prompt_settings(self) -> dict:
        """How this advisor asks its model, besides the question and the examples: what
        PROMPT_FILE holds."""
        return {"advisor": self.name, "system_prompt": self.system_prompt, "input_case": self.input_case,
                "input_units": self.input_units.to_dict() if self.input_units else None,
                "input_spelling": self.input_spelling,
                "input_synonyms": self.input_synonyms.to_dict() if self.input_synonyms else None}

    @property
    def rewrites_input(self) -> bool:
        """Whether `shown` does more than change letter case (any PROMPT_OPTIONAL setting on)."""
        return _rewriting(self.prompt_settings())

    def asked_as(self, settings: dict | None) -> Advisor:
        """This contract asking with pinned `settings` (read_prompt) instead of its own prompt;
        the schema stays this one's, since it is what answers are checked and constrained by.
        None (nothing pinned): this contract as it is."""
        if settings is None:
            return self
        if settings["advisor"] != self.name:
            raise ConfigError(f"the pinned prompt is advisor {settings['advisor']!r}'s, not {self.name!r}'s")
        pinned = {"system_prompt": settings["system_prompt"], "input_case": settings["input_case"],
                  **rewrites(settings, "the pinned prompt")}
        if all(getattr(self, k) == v for k, v in pinned.items()):
            return self
        return replace(self, **pinned)

    def violations(self, obj) -> list[Violation]:
        """Every way `obj` breaks the schema, deepest path first within each error."""
        errors = sorted(self._validator.iter_errors(obj), key=lambda e: (e.json_path, e.message))
        return [Violation(e.json_path, e.message) for e in errors]

    def normalize(self, obj: dict) -> dict:
        """Canonical form of a valid answer: schema field order, whole floats as ints."""
        order = {k: i for i, k in enumerate(self.fields)}
        return {k: canonical(obj[k]) for k in sorted(obj, key=lambda k: (order.get(k, len(order)), k))}

    def render(self, obj: dict) -> str:
        """The exact text an advisor is trained to write for `obj`."""
        return json.dumps(self.normalize(obj), ensure_ascii=False, separators=(",", ":"))

    def messages(self, text: str | None = None, image: bool = False,
                 examples: list[tuple[str, str]] = (), speller: Speller | None = None) -> list[dict]:
        """The chat the advisor's model answers: its system prompt, any solved `examples`
        (input, answer) as earlier turns, then the user's input (an image first, then any
        text). Dataset rows (which add the answer), evaluation and the service all reach it
        through `mondrian.core.retrieval.prompt_messages`, so a model is asked in serving
        exactly as it was taught.

        With `input_case: lower`, the input and the examples' inputs are shown lower-cased: an
        advisor whose answers never depend on letter case is spared learning "DORSET", "Dorset"
        and "dorset" as three strings (the tokenizer splits each differently, so a shouted
        place matches no example's place token for token). `input_units` and, given the index's
        `speller`, `input_spelling` rewrite them too (`shown`)."""
        text = self.shown(text, speller) if text and text.strip() else None
        examples = [(self.shown(q, speller), a) for q, a in examples]
        user = ([{"type": "image"}] + ([{"type": "text", "text": text}] if text else [])
                if image else text or "")
        shots = [m for q, a in examples for m in ({"role": "user", "content": q},
                                                  {"role": "assistant", "content": a})]
        return [{"role": "system", "content": self.system_prompt}, *shots, {"role": "user", "content": user}]

    def shown(self, text: str, speller: Speller | None = None) -> str:
        """A typed input as the model reads it: lower-cased, misspellings mended (with the
        index's `speller`), amounts in one unit, then phrases as their canonical words, as this
        advisor asks. Idempotent."""
        return show(text, lower=self.input_case == "lower", units=self.input_units,
                    speller=speller if self.input_spelling else None, synonyms=self.input_synonyms)



def write_prompt(folder: str | Path, advisor: Advisor) -> None:
    """Pin `advisor`'s prompt settings in folder/PROMPT_FILE (the folder is being built)."""
    text = json.dumps(advisor.prompt_settings(), indent=2, ensure_ascii=False) + "\n"
    (Path(folder) / PROMPT_FILE).write_text(text, encoding="utf-8")


def read_prompt(folder: str | Path) -> dict | None:
    """The prompt settings pinned in `folder` (a dataset, adapter or version); None where none
    are (made before prompts were pinned, or an imported mlx_lm adapter). A damaged file is a
    ConfigError naming it."""
    path = Path(folder) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not set(PROMPT_KEYS) <= set(data) <= {*PROMPT_KEYS, *PROMPT_OPTIONAL} \
            or not all(isinstance(data[k], str) for k in PROMPT_KEYS):
        raise ConfigError(f"{path}: must be an object of the strings {', '.join(PROMPT_KEYS)} "
                          f"(and optionally {', '.join(PROMPT_OPTIONAL)})")
    if data["input_case"] not in INPUT_CASES:
        raise ConfigError(f"{path}: input_case {data['input_case']!r} must be one of {', '.join(INPUT_CASES)}")
    rewrites(data, str(path))
    return {**_DEFAULTS, **data}


def rewrites(settings: dict, where: str) -> dict:
    """The rewrite settings (PROMPT_OPTIONAL) of an advisor YAML or of pinned prompt settings,
    checked, as Advisor fields (absent: off); a ConfigError naming `where` otherwise. The one
    reader of them."""
    units, spelling = settings.get("input_units"), settings.get("input_spelling", False)
    synonyms = settings.get("input_synonyms")
    try:
        units = Units.check(units, "input_units") if units is not None else None
        synonyms = Synonyms.check(synonyms, "input_synonyms") if synonyms is not None else None
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(spelling, bool):
        raise ConfigError(f"{where}: input_spelling must be true or false, got {spelling!r}")
    return {"input_units": units, "input_spelling": spelling, "input_synonyms": synonyms}


def _rewriting(settings: dict) -> bool:
    """Whether any rewrite setting (PROMPT_OPTIONAL) in `settings` is on."""
    return any(settings[k] != _DEFAULTS[k] for k in PROMPT_OPTIONAL)


def canonical(value):
    """Whole floats as ints, recursively: 100.0 and 100 are the same answer."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def loads_strict(text: str):
    """json.loads for advisor answers (production's and models'): NaN / Infinity and duplicate
    keys are errors (ValueError), not values that would slip past the schema."""
    return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicate_keys)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def lone_surrogate(text: str, obj: object) -> str | None:
    """The first lone surrogate (as `\\udXXX`) in `obj`, parsed from the JSON `text`, or None.
    JSON can escape one (`"\\ud800"`) but no UTF-8 text holds it, so SQLite, files and
    tokenizers fail on it later: refuse it where it comes in. (A valid pair is a character.)"""
    if not _SURROGATE_ESCAPE.search(text):
        return None  # the common case costs one regex scan
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"\\u{ord(exc.object[exc.start]):04x}"
    return None


def _load_case(path: Path, i: int, item: object, schema: dict, cls: type) -> Case:
    named = isinstance(item, dict) and isinstance(item.get("name"), str)
    where = f"{path}: case {item['name']!r}" if named else f"{path}: case {i + 1}"
    if isinstance(item, dict):
        missing = sorted({"name", "input", "expect"} - set(item))
        if missing:
            raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    case = from_dict(Case, item, where)  # refuses unknown keys by name
    if not isinstance(case.name, str) or not case.name.strip():
        raise ConfigError(f"{where}: name must be a non-empty string")
    if not isinstance(case.input, str) or not case.input.strip():
        raise ConfigError(f"{where}: input must be a non-empty string")
    if not isinstance(case.expect, dict) or not case.expect:
        raise ConfigError(f"{where}: expect must be a non-empty mapping of output fields")
    props = schema.get("properties", {})
    unknown = sorted(k for k in case.expect if k not in props)
    if unknown:
        raise ConfigError(f"{where}: expect names {', '.join(unknown)}, not field(s) of the "
                          f"output schema (fields: {', '.join(props)})")
    # Each expected value must be one the contract allows, so a case can be passed at all;
    # $defs travel along so a field's $ref still resolves.
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
    for key, value in case.expect.items():
        sub = props[key]
        check = cls({**sub, **defs} if isinstance(sub, dict) else sub, format_checker=cls.FORMAT_CHECKER)
        err = jsonschema.exceptions.best_match(check.iter_errors(value))
        if err is not None:
            raise ConfigError(f"{where}: expect {key}: {err.message}")
    return case


def _load_cases(path: Path, items: object, schema: dict, cls: type) -> tuple[Case, ...]:
    if not isinstance(items, list):
        raise ConfigError(f"{path}: cases must be a list, got {type(items).__name__}")
    cases = tuple(_load_case(path, i, item, schema, cls) for i, item in enumerate(items))
    seen: set[str] = set()
    for case in cases:
        if case.name in seen:
            raise ConfigError(f"{path}: case {case.name!r}: two cases have this name")
        seen.add(case.name)
    return cases


def load_advisor(path: str | Path) -> Advisor:
    path = Path(path)
    data = load_yaml(path)
    required = {"name", "input_kind", "system_prompt", "schema"}
    known = required | {"cases", "retrieval", "input_case", *PROMPT_OPTIONAL}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    missing = sorted(required - set(data))
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}")
    if data["input_kind"] not in INPUT_KINDS:
        raise ConfigError(f"{path}: input_kind '{data['input_kind']}' must be one of {', '.join(INPUT_KINDS)}")
    input_case = data.get("input_case", "as_typed")
    if input_case not in INPUT_CASES:
        raise ConfigError(f"{path}: input_case {input_case!r} must be one of {', '.join(INPUT_CASES)}")
    schema = data["schema"]
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"{path}: schema is not a valid JSON Schema ({exc.message})") from exc
    if schema.get("type") != "object":
        raise ConfigError(f"{path}: schema must describe a JSON object (type: object)")
    cases = _load_cases(path, data.get("cases", []), schema, cls)
    retrieval = _load_retrieval(path, data)
    return Advisor(name=str(data["name"]), input_kind=data["input_kind"],
                   system_prompt=str(data["system_prompt"]).strip(), schema=schema, source=str(path),
                   cases=cases, retrieval=retrieval, input_case=input_case,
                   **_load_rewrites(path, data, retrieval),
                   _validator=cls(schema, format_checker=cls.FORMAT_CHECKER))


def _load_rewrites(path: Path, data: dict, retrieval: Retrieval | None) -> dict:
    found = rewrites(data, str(path))
    if _rewriting(found) and data["input_kind"] != "text":
        raise ConfigError(f"{path}: {', '.join(PROMPT_OPTIONAL)} rewrite typed text; this advisor takes "
                          f"{data['input_kind']}")
    if found["input_spelling"] and retrieval is None:
        raise ConfigError(f"{path}: input_spelling mends words from the retrieval index's questions; "
                          "add retrieval: {k: N}")
    return found


def _load_retrieval(path: Path, data: dict) -> Retrieval | None:
    if data.get("retrieval") is None:
        return None
    where = f"{path}: retrieval"
    if data["input_kind"] != "text":
        raise ConfigError(f"{where}: only text advisors retrieve examples (this one takes {data['input_kind']})")
    if not isinstance(data["retrieval"], dict):
        raise ConfigError(f"{where} must be a mapping such as {{k: 4}}")
    got = from_dict(Retrieval, data["retrieval"], where)
    if isinstance(got.k, bool) or not isinstance(got.k, int) or not 1 <= got.k <= 32:
        raise ConfigError(f"{where}: k must be an integer in 1..32, got {got.k!r}")
    if got.method not in RETRIEVAL_METHODS:
        raise ConfigError(f"{where}: method must be one of {', '.join(RETRIEVAL_METHODS)}, got {got.method!r}")
    return got


def load_advisors(extra_dirs: list[str | Path] = ()) -> dict[str, Advisor]:
    """Shipped advisors, then those in `extra_dirs` (a later file of the same name wins)."""
    found: dict[str, Advisor] = {}
    for folder in [BUILTIN_DIR, *map(Path, extra_dirs)]:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.y*ml")):
            advisor = load_advisor(path)
            found[advisor.name] = advisor
    return found


def get_advisor(name: str, extra_dirs: list[str | Path] = ()) -> Advisor:
    advisors = load_advisors(extra_dirs)
    if name not in advisors:
        raise ConfigError(f"unknown advisor '{name}' (known: {', '.join(sorted(advisors)) or 'none'})")
    return advisors[name]
