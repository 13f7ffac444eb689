"""mondrian.dataset: link manifest -> leakage-free train/valid/test JSONL the peer loaders accept."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mondrian.core.contracts import Advisor, load_advisors, read_prompt
from mondrian.core.fingerprint import file_sha256
from mondrian.core.retrieval import RetrievalIndex, prompt_messages
from mondrian.dataset import build as ds
from mondrian.dataset import rows as ds_rows
from mondrian.dataset.build import LeakageError, build_dataset
from mondrian.dataset.examples import TWIN
from mondrian.dataset.leakage import check_leakage
from mondrian.dataset.report import DatasetReport
from mondrian.dataset.splits import split_of, validate_ratios
from mondrian.demo.images import generate_image
from mondrian.demo.questions import generate
from mondrian.link.linker import normalize_text

SPLITS = ("train", "valid", "test")


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def advisors() -> dict[str, Advisor]:
    return load_advisors()


@pytest.fixture(scope="module")
def fitq(advisors: dict[str, Advisor]) -> Advisor:
    return advisors["fit-query"]


@pytest.fixture(scope="module")
def critic(advisors: dict[str, Advisor]) -> Advisor:
    return advisors["photo-critic"]


def sha_text(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode()).hexdigest()


def text_rows(advisor: Advisor, n: int, seed: int = 0, prefix: str = "job") -> list[dict]:
    rows = []
    for i, ex in enumerate(generate(n, seed=seed)):
        out = advisor.normalize(ex.answer)
        rows.append({"job_id": f"{prefix}-{seed}-{i}", "advisor": advisor.name, "status": "linked",
                     "input": {"text": ex.question}, "output": out,
                     "output_sha256": hashlib.sha256(advisor.render(out).encode()).hexdigest(),
                     "group": sha_text(ex.question)})
    return rows


def rejected(job_id: str, reason: str, advisor: str = "fit-query") -> dict:
    return {"job_id": job_id, "advisor": advisor, "status": "rejected", "reason": reason,
            "detail": "made up in a test"}


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (folder / "summary.json").write_text(json.dumps({"rows": len(rows)}))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def index(folder: Path) -> dict[str, dict]:
    with open(folder / "index.jsonl") as f:
        return {r["job_id"]: r for r in map(json.loads, f)}


def index_rows(folder: Path) -> list[dict]:
    with open(folder / "index.jsonl") as f:
        return [json.loads(line) for line in f]


def read_split(folder: Path, split: str) -> list[dict]:
    with open(folder / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def text_manifest(tmp_path_factory: pytest.TempPathFactory, fitq: Advisor) -> Path:
    rows = text_rows(fitq, 200)
    rows += [rejected("bad-1", "invalid_json"), rejected("bad-2", "invalid_json"),
             rejected("bad-3", "no_output")]
    rows.append(rejected("other-1", "invalid_json", advisor="photo-critic"))  # not ours
    return write_manifest(tmp_path_factory.mktemp("text") / "manifest", rows)


@pytest.fixture(scope="module")
def text_built(tmp_path_factory: pytest.TempPathFactory, text_manifest: Path, fitq: Advisor,
               tiny_llama) -> tuple[Path, DatasetReport]:
    out = tmp_path_factory.mktemp("text_out") / "data"
    report = build_dataset(text_manifest, fitq, out, None, tokenizer_path=tiny_llama.path)
    return out, report


@pytest.fixture(scope="module")
def image_setup(tmp_path_factory: pytest.TempPathFactory, critic: Advisor) -> tuple[Path, Path]:
    """Six generated paintings under a data root; IMG_dup.png repeats IMG_0's bytes."""
    root = tmp_path_factory.mktemp("data_root")
    (root / "images").mkdir()
    rows = []
    for seed in range(6):
        img, crit = generate_image(seed, size=64)
        img.save(root / "images" / f"IMG_{seed}.png")
        rows.append({"job_id": f"img-{seed}", "advisor": critic.name, "status": "linked",
                     "input": {"image": f"images/IMG_{seed}.png", "text": None,
                               "image_sha256": file_sha256(root / "images" / f"IMG_{seed}.png")},
                     "output": critic.normalize(crit)})
    shutil.copyfile(root / "images/IMG_0.png", root / "images/IMG_dup.png")
    rows.append(dict(rows[0], job_id="img-dup", input={"image": "images/IMG_dup.png", "text": None}))
    rows.append(rejected("img-bad", "invalid_json", advisor=critic.name))
    return root, write_manifest(tmp_path_factory.mktemp("img") / "manifest", rows)


# --- splitting -------------------------------------------------------------------------------


def test_normalize_and_split_of_are_pure():
    assert normalize_text("  Wind   SITES\tover 100kW\n") == "wind sites over 100kw"
    g = sha_text("wind sites")
    assert split_of(g) == split_of(g, (0.8, 0.1, 0.1), "mondrian-split-v1") in SPLITS
    # Another salt reshuffles: over 200 groups some must move.
    groups = [sha_text(f"q{i}") for i in range(200)]
    assert any(split_of(x) != split_of(x, salt="other-salt") for x in groups)
    assert all(split_of(x, (0.999999, 0.000001, 0.0)) in ("train", "valid") for x in groups)
    assert {split_of(x, (0.5, 0.5, 0.0)) for x in groups} == {"train", "valid"}


@pytest.mark.parametrize("ratios, message", [
    ((0.8, 0.2), "three numbers"),
    ("0.8", "three numbers"),
    ((0.8, 0.1, 0.2), "sum to 1"),
    ((0.9, -0.1, 0.2), "'valid' must not be negative"),
    ((0.8, float("nan"), 0.1), "'valid' must be a finite number"),
    ((0.8, "0.1", 0.1), "'valid' must be a finite number"),
    ((0.0, 0.5, 0.5), "'train' must be > 0"),
    ((0.9, 0.0, 0.1), "'valid' must be > 0"),
])
def test_bad_ratios_rejected(ratios, message, tmp_path, text_manifest, fitq):
    with pytest.raises(ValueError, match=message):
        validate_ratios(ratios)
    with pytest.raises(ValueError, match=message):
        build_dataset(text_manifest, fitq, tmp_path / "out", None, ratios=ratios)
    assert not (tmp_path / "out").exists()


def test_ratios_respected_on_2000_rows(tmp_path, fitq):
    manifest = write_manifest(tmp_path / "m", text_rows(fitq, 2000, seed=7))
    for ratios in [(0.8, 0.1, 0.1), (0.6, 0.25, 0.15)]:
        report = build_dataset(manifest, fitq, tmp_path / "out", None, ratios=ratios)
        total = sum(report.counts.values())
        # a held-out question that reads as an earlier split's once rewritten is dropped, counted
        assert total + report.manifest["dropped"].get(TWIN, {"count": 0})["count"] == 2000
        assert total >= 1990
        for split, ratio in zip(SPLITS, ratios, strict=True):
            assert abs(report.counts[split] / total - ratio) < 0.03, (split, report.counts)
    report = build_dataset(manifest, fitq, tmp_path / "out", None, ratios=(0.9, 0.1, 0))
    assert report.counts["test"] == 0 and not [w for w in report.warnings if "empty" in w]
    assert (tmp_path / "out" / "test.jsonl").read_text() == ""


# --- text rows and mlx-lm --------------------------------------------------------------------


def test_text_rows_load_with_mlx_lm(text_built, fitq, tiny_llama):
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.utils import load_tokenizer

    out, report = text_built
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset_stats.json", "dataset_stats.md", "index.jsonl", "prompt.json", "retrieval_index.json",
        "test.jsonl", "train.jsonl", "valid.jsonl"]
    # how the rows ask is pinned beside them, and is part of the dataset's identity
    assert read_prompt(out) == fitq.prompt_settings()
    assert report.fingerprints["prompt.json"] == file_sha256(out / "prompt.json")
    row = read_split(out, "train")[0]
    assert list(row) == ["messages"]
    # fit-query retrieves k solved examples (earlier turns) before the question
    assert [m["role"] for m in row["messages"]] == ["system"] + ["user", "assistant"] * (fitq.retrieval.k + 1)
    assert row["messages"][0]["content"] == fitq.system_prompt
    answer = json.loads(row["messages"][-1]["content"])
    assert fitq.violations(answer) == [] and fitq.render(answer) == row["messages"][-1]["content"]

    tokenizer = load_tokenizer(Path(tiny_llama.path))
    args = SimpleNamespace(data=str(out), train=True, test=True, hf_dataset=None,
                           mask_prompt=True)
    splits = load_dataset(args, tokenizer)
    for split, data in zip(SPLITS, splits, strict=True):
        assert len(data) == report.counts[split] > 0
    train = CacheDataset(splits[0])
    tokens, offset = train[0]
    assert 0 < offset < len(tokens)
    assert tokenizer.decode(tokens[offset:]).startswith(row["messages"][-1]["content"])
    # Our token statistics are what mlx-lm itself computes for the same rows.
    lengths = sorted(len(train[i][0]) for i in range(len(train)))
    t = report.tokens["train"]["total"]
    assert (t["min"], t["max"], t["count"]) == (lengths[0], lengths[-1], len(lengths))
    answers = [len(train[i][0]) - train[i][1] for i in range(len(train))]
    assert report.tokens["train"]["answer"]["max"] == max(answers)


def test_stats(text_built, fitq, text_manifest, tiny_llama, tmp_path):
    out, report = text_built
    stats = json.loads((out / "dataset_stats.json").read_text())
    assert stats == {k: v for k, v in report.to_dict().items() if k != "seconds"}
    m = stats["manifest"]
    assert m["rows"] == 204 and m["linked"] == 200 == sum(stats["counts"].values())
    assert m["rejected_upstream"] == {"invalid_json": 2, "no_output": 1}
    assert m["other_advisors"] == {"photo-critic": 1} and m["dropped"] == {}
    assert m["group_mismatch"] == 0
    assert sum(stats["groups"].values()) <= 200
    assert stats["leakage"]["ok"] and stats["leakage"]["key"] == "normalized_user_text"
    assert stats["truncated"]["max_seq_length"] == 2048
    assert all(stats["truncated"][s]["count"] == 0 for s in SPLITS)
    # Field distributions: every field accounted for on every row.
    fields = stats["fields"]
    assert list(fields)[: len(fitq.fields)] == fitq.fields
    for d in fields.values():
        assert d["present"] + d["absent"] == 200
    assert fields["query_type"]["kind"] == "enum"
    assert sum(fields["query_type"]["values"].values()) == 200
    assert fields["capacity_min_kw"]["kind"] == "number"
    assert fields["capacity_min_kw"]["min"] <= fields["capacity_min_kw"]["mean"] \
        <= fields["capacity_min_kw"]["max"]
    pp = fields["postcode_patterns"]
    assert pp["kind"] == "array" and sum(pp["lengths"].values()) == pp["present"]
    assert fields["include_regional"]["kind"] == "boolean"
    assert sum(fields["include_regional"]["counts"].values()) == fields["include_regional"]["present"]
    assert fields["fit_id"]["kind"] == "string" and "distinct" in fields["fit_id"]
    for s in SPLITS:
        assert sum(stats["fields_by_split"][s]["query_type"]["values"].values()) == stats["counts"][s]
    # Fingerprints are the files' sha256.
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "index.jsonl"):
        assert stats["fingerprints"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert stats["fingerprints"]["manifest.jsonl"] == hashlib.sha256(
        (text_manifest / "manifest.jsonl").read_bytes()).hexdigest()
    md = (out / "dataset_stats.md").read_text()
    for needle in ("## Splits", "invalid_json: 2", "| train | total |", "**query_type** (enum)",
                   "ok: no group in more than one split", report.fingerprint):
        assert needle in md

    # A tiny max_seq_length: every row would be cut, and the stats name them.
    short = build_dataset(text_manifest, fitq, tmp_path / "short", None,
                          tokenizer_path=tiny_llama.path, max_seq_length=16)
    for s in SPLITS:
        assert short.truncated[s]["count"] == short.counts[s] == len(short.truncated[s]["job_ids"])
    assert short.fingerprint == report.fingerprint  # the same rows, only the stats differ
    # Without a tokenizer, lengths are skipped with a note.
    bare = build_dataset(text_manifest, fitq, tmp_path / "bare", None)
    assert "skipped" in bare.tokens["note"] and "skipped" in bare.truncated["note"]
    assert "skipped: no tokenizer_path given" in (tmp_path / "bare" / "dataset_stats.md").read_text()


def test_rows_that_cannot_be_taught_are_dropped_and_counted(tmp_path, fitq):
    rows = text_rows(fitq, 40)
    rows.append(dict(rows[0]))  # same job id twice
    rows.append(dict(rows[1], job_id="bad-out", output={"query_type": "nonsense"}))
    rows.append(dict(rows[1], job_id="no-text", input={"text": "   "}))
    rows.append(dict(rows[2], job_id="wrong-group", group="0" * 64))
    report = build_dataset(write_manifest(tmp_path / "m", rows), fitq, tmp_path / "out", None)
    dropped = report.manifest["dropped"]
    assert dropped["duplicate_job_id"]["job_ids"] == [rows[0]["job_id"]]
    assert dropped["contract_violation"]["job_ids"] == ["bad-out"]
    assert dropped["missing_text"]["job_ids"] == ["no-text"]
    assert report.manifest["group_mismatch"] == 1
    # Same question, same answer as rows[2]: the group is recomputed, so it sits with rows[2].
    idx = index(tmp_path / "out")
    assert idx["wrong-group"]["split"] == idx[rows[2]["job_id"]]["split"]
    assert sum(report.counts.values()) == 41


# --- determinism, stability, grouping ---------------------------------------------------------


def test_deterministic_and_order_independent(tmp_path, text_manifest, fitq, tiny_llama):
    out = tmp_path / "out"
    build_dataset(text_manifest, fitq, out, None, tokenizer_path=tiny_llama.path)
    first = snapshot(out)
    build_dataset(text_manifest, fitq, out, None, tokenizer_path=tiny_llama.path)
    assert snapshot(out) == first  # byte-identical, stats included
    # Shuffled manifest: same rows in the same order (the sort key does not depend on input order).
    lines = (text_manifest / "manifest.jsonl").read_text().splitlines(keepends=True)
    shuffled = write_manifest(tmp_path / "shuffled", [json.loads(x) for x in reversed(lines)])
    build_dataset(shuffled, fitq, tmp_path / "out2", None)
    again = snapshot(tmp_path / "out2")
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "index.jsonl"):
        assert again[name] == first[name]


def test_adding_rows_never_moves_existing_ones(tmp_path, fitq):
    old = text_rows(fitq, 200, seed=1)
    new = text_rows(fitq, 50, seed=2, prefix="new")
    build_dataset(write_manifest(tmp_path / "m1", old), fitq, tmp_path / "a", None)
    build_dataset(write_manifest(tmp_path / "m2", new[:25] + old + new[25:]), fitq,
                  tmp_path / "b", None)
    a, b = index(tmp_path / "a"), index(tmp_path / "b")
    assert len(b) == 250 and set(a) <= set(b)
    assert all(b[j]["split"] == a[j]["split"] for j in a)
    # Old rows keep their relative order inside each split too.
    for s in SPLITS:
        old_order = [j for j in sorted(b, key=lambda j: b[j]["line"]) if j in a and b[j]["split"] == s]
        assert old_order == sorted((j for j in a if a[j]["split"] == s), key=lambda j: a[j]["line"])


def test_case_and_whitespace_variants_share_a_split(tmp_path, fitq):
    rows = []
    for i, ex in enumerate(generate(60, seed=3)):
        q = ex.question
        for k, variant in enumerate([q, q.upper(), f"  {q.title()}  ", q.replace(" ", "   \t")]):
            rows.append({"job_id": f"v{i}-{k}", "advisor": fitq.name, "status": "linked",
                         "input": {"text": variant}, "output": fitq.normalize(ex.answer)})
    report = build_dataset(write_manifest(tmp_path / "m", rows), fitq, tmp_path / "out", None,
                           ratios=(0.4, 0.3, 0.3))
    idx = index(tmp_path / "out")
    by_group: dict[str, set[str]] = {}
    for r in idx.values():
        by_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_group.values())
    assert {r["split"] for r in idx.values()} == set(SPLITS)  # groups did spread over splits
    for i in range(60):
        assert len({idx[f"v{i}-{k}"]["split"] for k in range(4)}) == 1
    assert report.leakage.ok


# --- leakage ---------------------------------------------------------------------------------


def test_leakage_check_fails_on_a_crafted_leak(text_built, tmp_path, fitq):
    src, report = text_built
    assert check_leakage(src).ok and report.leakage.ok
    out = tmp_path / "leaky"
    shutil.copytree(src, out)
    row = read_split(out, "train")[0]
    question = row["messages"][-2]["content"]
    row["messages"][-2]["content"] = "  " + question.upper().replace(" ", "  \t") + " "
    with open(out / "test.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    leak = check_leakage(out)
    assert not leak.ok
    assert [g.key for g in leak.leaked] == [normalize_text(question)]
    train_n = sum(normalize_text(r["messages"][-2]["content"]) == normalize_text(question)
                  for r in read_split(out, "train"))
    # the retrieval index counts as train, keyed as the rows read: its example is one more
    index = RetrievalIndex.load(out / "retrieval_index.json")
    train_n += sum(normalize_text(fitq.shown(e.input, index.speller)) == normalize_text(question)
                   for e in index.examples)
    assert leak.leaked[0].splits == {"train": train_n, "test": 1}
    assert "1 group(s) in more than one split" in leak.summary()


def test_build_raises_on_leak_and_keeps_previous_output(tmp_path, text_manifest, fitq, monkeypatch):
    out = tmp_path / "out"
    build_dataset(text_manifest, fitq, out, None)
    before = snapshot(out)
    calls = iter(range(10**6))
    # A broken splitter that ignores the group: the check, reading the files, must catch it.
    monkeypatch.setattr(ds_rows, "split_of", lambda group, ratios, salt: SPLITS[next(calls) % 3])
    # Every group has two rows, next to each other: consecutive calls, different splits.
    rows = [x for r in text_rows(fitq, 30, seed=5) for x in (r, dict(r, job_id=r["job_id"] + "-b"))]
    with pytest.raises(LeakageError, match="group\\(s\\) in more than one split") as exc:
        build_dataset(write_manifest(tmp_path / "m", rows), fitq, out, None)
    assert not exc.value.report.ok
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_mid_build_leaves_previous_output(tmp_path, text_manifest, fitq, monkeypatch):
    out = tmp_path / "out"
    build_dataset(text_manifest, fitq, out, None)
    before = snapshot(out)

    def boom(report: Any) -> str:  # after the split files are written, before the swap
        raise RuntimeError("disk full")

    monkeypatch.setattr(ds, "render_markdown", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_dataset(write_manifest(tmp_path / "m", text_rows(fitq, 30, seed=9)), fitq, out, None)
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_refuses_to_replace_a_foreign_folder(tmp_path, text_manifest, fitq):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a dataset built by mondrian.dataset.build"):
        build_dataset(text_manifest, fitq, foreign, None)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="no manifest.jsonl"):
        build_dataset(tmp_path, fitq, tmp_path / "x", None)


# --- image rows and mlx-vlm ------------------------------------------------------------------


def test_image_rows_load_with_mlx_vlm(tmp_path, image_setup, critic):
    import mlx_vlm
    from mlx_vlm.trainer.datasets import load
    from mlx_vlm.trainer.vlm.sft.dataset import VisionDataset

    from mondrian.models.sources import resolve

    root, manifest = image_setup
    vl = resolve("tiny:qwen2-vl")
    out = tmp_path / "vis"
    report = build_dataset(manifest, critic, out, root, ratios=(0.5, 0.25, 0.25),
                           tokenizer_path=vl.path)
    assert sum(report.counts.values()) == 7
    assert report.manifest["rejected_upstream"] == {"invalid_json": 1}
    assert report.leakage.ok and report.leakage.key == "image_sha256"
    assert "text tokens only" in report.tokens["note"]
    sha0 = file_sha256(root / "images/IMG_0.png")
    idx = index(out)
    assert idx["img-0"]["group"] == idx["img-dup"]["group"] == sha0
    assert idx["img-0"]["split"] == idx["img-dup"]["split"]
    # Self-contained: content-addressed copies (or hard links) of the six distinct images.
    names = sorted(p.name for p in (out / "images").iterdir())
    assert len(names) == 6 and f"{sha0}.png" in names
    for name in names:
        assert file_sha256(out / "images" / name) == name.removesuffix(".png")

    rows = [r for s in SPLITS for r in read_split(out, s)]
    row = rows[0]
    assert list(row) == ["images", "messages"]
    assert row["images"][0].startswith("images/") and (out / row["images"][0]).is_file()
    assert row["messages"][1] == {"role": "user", "content": [{"type": "image"}]}
    assert critic.violations(json.loads(row["messages"][2]["content"])) == []

    model, processor = mlx_vlm.load(vl.path)
    raw = load(str(out))  # what `python -m mlx_vlm.train --data` reads
    split = next(s for s in SPLITS if len(raw.get(s, [])))
    data = VisionDataset(raw[split], model.config, processor,
                         config={"train_on_completions": True})
    x = data[0]
    ids = x["input_ids"].tolist()
    image_token = model.config.image_token_id
    assert ids.count(image_token) > 0
    assert x["pixel_values"] is not None and x["pixel_values"].shape[0] > 0
    assert x["image_grid_thw"].tolist()[0][0] == 1
    text = processor.tokenizer.decode(ids)
    # Image first in the user turn, and the answer is the completion the loss trains on.
    assert "<|im_start|>user\n<|vision_start|><|image_pad|>" in text
    answer = [t for t, m in zip(ids, x["completion_mask"].tolist(), strict=True) if m]
    assert processor.tokenizer.decode(answer).startswith(raw[split][0]["messages"][2]["content"])


def test_image_leak_detected_from_file_bytes(tmp_path, image_setup, critic):
    root, manifest = image_setup
    out = tmp_path / "vis"
    build_dataset(manifest, critic, out, root, ratios=(0.5, 0.25, 0.25))
    rows = {s: read_split(out, s) for s in SPLITS}
    src_split = next(s for s in SPLITS if rows[s])
    dst_split = next(s for s in SPLITS if s != src_split)
    row = rows[src_split][0]
    # Same bytes under another name: keyed by content, so still a leak.
    shutil.copyfile(out / row["images"][0], out / "images" / "renamed.png")
    with open(out / f"{dst_split}.jsonl", "a") as f:
        f.write(json.dumps(dict(row, images=["images/renamed.png"])) + "\n")
    leak = check_leakage(out)
    assert not leak.ok
    assert [g.key for g in leak.leaked] == [Path(row["images"][0]).stem]
    assert leak.leaked[0].splits[dst_split] == 1
    # A missing image cannot be vouched for either.
    (out / "images" / "renamed.png").unlink()
    assert any("missing" in p for p in check_leakage(out).problems)


def test_image_rows_need_a_data_root_and_the_same_bytes(tmp_path, image_setup, critic):
    root, manifest = image_setup
    with pytest.raises(ValueError, match="data_root"):
        build_dataset(manifest, critic, tmp_path / "x", None)
    rows = [json.loads(x) for x in (manifest / "manifest.jsonl").read_text().splitlines()]
    rows.append(dict(rows[1], job_id="gone", input={"image": "images/nope.png"}))
    rows.append(dict(rows[1], job_id="escape", input={"image": "../outside.png"}))
    rows.append(dict(rows[1], job_id="changed",
                     input={"image": "images/IMG_2.png", "image_sha256": "0" * 64}))
    report = build_dataset(write_manifest(tmp_path / "m", rows), critic, tmp_path / "out", root,
                           ratios=(0.5, 0.25, 0.25))
    assert {k: v["job_ids"] for k, v in report.manifest["dropped"].items()} == {
        "image_changed": ["changed"], "image_missing": ["gone"],
        "image_outside_data_root": ["escape"]}


# --- the one prompt builder -------------------------------------------------------------------


def test_training_rows_ask_exactly_what_the_service_asks(text_built, text_manifest, fitq: Advisor,
                                                        critic: Advisor):
    """Every row's prompt is `prompt_messages` of its input as typed with the dataset's index
    (the builder the service and evaluation use), excluding the row's own group and any
    example that reads as the row does, with the answer appended; images come first, then
    any text."""
    out, _ = text_built
    index = RetrievalIndex.load(out / "retrieval_index.json")
    typed = {r["job_id"]: r["input"]["text"] for r in map(json.loads, open(text_manifest / "manifest.jsonl"))
             if r["status"] == "linked"}
    where = {(r["split"], r["line"]): r for r in index_rows(out)}
    for n, line in enumerate((out / "train.jsonl").read_text().splitlines()[:50], 1):
        msgs, row = json.loads(line)["messages"], where[("train", n)]
        question = typed[row["job_id"]]
        alike = {e.group for e in index.examples if normalize_text(fitq.shown(e.input, index.speller))
                 == normalize_text(fitq.shown(question, index.speller))}
        built, _ = prompt_messages(fitq, question, index, exclude_groups={row["group"], *alike})
        assert msgs[:-1] == built and msgs[-1]["role"] == "assistant"
        assert msgs[-2]["content"] == fitq.shown(question, index.speller)
    assert critic.messages(None, image=True)[1]["content"] == [{"type": "image"}]
    assert critic.messages("  ", image=True)[1]["content"] == [{"type": "image"}]
    assert critic.messages("why?", image=True)[1]["content"] == [{"type": "image"},
                                                                {"type": "text", "text": "why?"}]
    assert fitq.messages("wind in kent") == [{"role": "system", "content": fitq.system_prompt},
                                             {"role": "user", "content": "wind in kent"}]


def test_a_held_out_row_that_reads_as_a_train_question_is_dropped_and_counted(tmp_path, fitq):
    """fit-query shows amounts in kW: "wind 1 mw in kent" and "wind 1000kw in kent" are two
    groups to the splitter but one question to the model, so the held-out one goes, counted."""
    assert fitq.input_units is not None and fitq.retrieval is not None
    rows = text_rows(fitq, 60)
    pairs = [(f"wind {n} mw in kent", f"wind {n * 1000}kw in kent") for n in range(1, 400)]
    held, taught = next((a, b) for a, b in pairs  # the first pair the hash puts apart
                        if split_of(sha_text(a)) != "train" and split_of(sha_text(b)) == "train")
    answer = {"query_type": "search", "technology": "Wind", "capacity_min_kw": 1000, "postcode_patterns": ["CT", "ME"]}
    for job_id, q in (("held", held), ("taught", taught)):
        rows.append(dict(rows[0], job_id=job_id, input={"text": q}, output=answer, group=sha_text(q),
                         output_sha256=hashlib.sha256(fitq.render(answer).encode()).hexdigest()))
    report = build_dataset(write_manifest(tmp_path / "m", rows), fitq, tmp_path / "out", None)
    twins = report.manifest["dropped"][TWIN]
    assert "held" in twins["job_ids"] and "taught" not in twins["job_ids"]
    # counts are conserved: every row is kept or dropped with the reason
    assert report.manifest["linked"] == sum(report.counts.values()) == 62 - twins["count"]
    assert any(f"{twins['count']} valid/test row(s) dropped" in w for w in report.warnings)
    kept = index(tmp_path / "out")
    assert "held" not in kept and kept["taught"]["split"] == "train" and report.leakage.ok
    # it reads as the train row does (other twins here: held-out questions a train typo mends into)
    reads = {normalize_text(r["messages"][-2]["content"]) for r in read_split(tmp_path / "out", "train")}
    assert normalize_text(fitq.shown(held)) == normalize_text(fitq.shown(taught)) in reads
    # the same rows without the rewriting keep both: typed differently, they are two questions
    plain = replace(fitq, input_units=None, input_spelling=False, input_synonyms=None)
    both = build_dataset(write_manifest(tmp_path / "m2", rows), plain, tmp_path / "out2", None)
    assert TWIN not in both.manifest["dropped"] and "held" in index(tmp_path / "out2")
