"""What a dataset build produced: `DatasetReport`, written as dataset_stats.json and .md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mondrian.dataset.leakage import LeakageReport
from mondrian.dataset.splits import SPLITS

FORMAT = "mondrian-dataset/1"  # in dataset_stats.json: marks a folder the build may replace


@dataclass
class DatasetReport:
    """What a build produced; `to_dict()` is what dataset_stats.json holds (less `seconds`)."""

    out_dir: str
    advisor: str
    input_kind: str
    ratios: tuple[float, float, float]
    salt: str
    counts: dict[str, int]  # rows per split
    groups: dict[str, int]  # leakage groups per split
    manifest: dict[str, Any]  # rows read, linked, rejected upstream by reason, dropped here
    tokens: dict[str, Any]  # token lengths per split (or a note why they were skipped)
    truncated: dict[str, Any]  # per split: rows longer than max_seq_length and their job ids
    fields: dict[str, Any]  # output field distributions, all rows
    fields_by_split: dict[str, Any]
    leakage: LeakageReport
    fingerprints: dict[str, str]  # sha256 of each output file and of the manifest
    fingerprint: str  # one sha256 over the split files and images: the dataset's identity
    warnings: list[str] = field(default_factory=list)
    # the retrieval index (advisors with `retrieval:`): k, method, examples, fingerprint
    retrieval: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "out_dir": self.out_dir, "advisor": self.advisor,
            "input_kind": self.input_kind, "ratios": list(self.ratios), "salt": self.salt,
            "counts": dict(self.counts), "groups": dict(self.groups),
            "manifest": self.manifest, "tokens": self.tokens, "truncated": self.truncated,
            "fields": self.fields, "fields_by_split": self.fields_by_split,
            "leakage": self.leakage.to_dict(), "fingerprints": dict(self.fingerprints),
            "fingerprint": self.fingerprint, "warnings": list(self.warnings),
            "retrieval": self.retrieval, "seconds": self.seconds,
        }


def _head_and_splits(r: DatasetReport) -> list[str]:
    total = sum(r.counts.values())
    m = r.manifest
    lines = [
        f"# Dataset: {r.advisor} ({r.input_kind})", "",
        f"- fingerprint: `{r.fingerprint}`",
        f"- ratios train/valid/test: {'/'.join(f'{x:g}' for x in r.ratios)}, salt `{r.salt}`",
        (f"- retrieval: k={r.retrieval['k']} nearest of {r.retrieval['examples']} train examples "
         f"({r.retrieval['method']}), index `{r.retrieval['fingerprint']}`" if r.retrieval
         else "- retrieval: none (prompts carry no examples)"),
        f"- manifest: {m['rows']} rows, {m['linked']} used, "
        f"{m['rejected_upstream_total']} rejected upstream, "
        f"{sum(d['count'] for d in m['dropped'].values())} dropped here, "
        f"{sum(m['other_advisors'].values())} for other advisors", "",
        "## Splits", "", "| split | rows | share | groups |", "|---|---:|---:|---:|",
    ]
    for s in SPLITS:
        share = r.counts[s] / total if total else 0.0
        lines.append(f"| {s} | {r.counts[s]} | {share:.1%} | {r.groups[s]} |")
    lines.append(f"| total | {total} | | {sum(r.groups.values())} |")
    return lines


def _manifest_outcome(m: dict[str, Any]) -> list[str]:
    lines = ["", "## Rejected upstream (by reason)", ""]
    lines += [f"- {k}: {v}" for k, v in m["rejected_upstream"].items()] or ["- none"]
    lines += ["", "## Dropped here (by reason)", ""]
    lines += [f"- {k}: {v['count']} ({', '.join(v['job_ids'][:10])}"
              f"{', ...' if v['count'] > 10 else ''})" for k, v in m["dropped"].items()] or ["- none"]
    if m["group_mismatch"]:
        lines.append(f"- note: {m['group_mismatch']} manifest `group` values differed from the "
                     "recomputed ones (the recomputed ones were used)")
    if m["conflicting_groups"]:
        lines.append(f"- note: {m['conflicting_groups']} group(s) have more than one distinct answer")
    return lines


def _tokens_and_truncation(r: DatasetReport) -> list[str]:
    lines = ["", "## Token lengths", ""]
    if "train" not in r.tokens:
        lines.append(f"{r.tokens['note']}.")
    else:
        lines += [f"Tokenizer `{r.tokens['tokenizer']}`: {r.tokens['note']}.", "",
                  "| split | part | min | mean | p50 | p95 | max |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for s in SPLITS:
            for part in ("total", "answer"):
                t = r.tokens[s][part]
                if t["count"]:
                    lines.append(f"| {s} | {part} | {t['min']} | {t['mean']} | {t['p50']} | "
                                 f"{t['p95']} | {t['max']} |")
                else:
                    lines.append(f"| {s} | {part} | | | | | |")
    lines += ["", f"## Truncation (max_seq_length {r.truncated['max_seq_length']})", ""]
    if "train" not in r.truncated:
        lines.append(f"{r.truncated['note']}.")
    else:
        for s in SPLITS:
            t = r.truncated[s]
            ids = ", ".join(t["job_ids"][:20]) + (", ..." if t["count"] > 20 else "")
            lines.append(f"- {s}: {t['count']}" + (f" ({ids})" if t["count"] else ""))
    return lines


def _field_lines(fields: dict[str, Any]) -> list[str]:
    lines = ["", "## Output fields (all rows)", ""]
    for name, d in fields.items():
        head = f"- **{name}** ({d['kind']}): present {d['present']}, absent {d['absent']}"
        if d["kind"] == "boolean":
            head += f"; true {d['counts']['true']}, false {d['counts']['false']}"
        elif d["kind"] == "number" and "min" in d:
            head += f"; min {d['min']}, mean {d['mean']}, max {d['max']}"
        elif d["kind"] == "array":
            head += f"; lengths {d['lengths']}; values {d['values']}"
        elif d["kind"] == "enum":
            head += f"; values {d['values']}"
        elif "distinct" in d:
            head += f"; {d['distinct']} distinct; chars {d.get('chars')}"
        lines.append(head)
    return lines


def render_markdown(r: DatasetReport) -> str:
    """dataset_stats.md: the report for a reader."""
    lines = _head_and_splits(r) + _manifest_outcome(r.manifest) + _tokens_and_truncation(r)
    lines += _field_lines(r.fields)
    lines += ["", "## Leakage check", "", f"- {r.leakage.summary()} (key: {r.leakage.key})"]
    lines += ["", "## Fingerprints (sha256)", ""]
    lines += [f"- {k}: `{v}`" for k, v in r.fingerprints.items()]
    if r.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r.warnings]
    return "\n".join(lines) + "\n"
