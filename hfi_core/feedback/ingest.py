"""Ingest feedback exports into ``labels.parquet`` / ``pairs.parquet``, all or nothing.

``ingest(manifest, sources, out, settings)``:

1. reads every new source *and* every source ingested before (``out/raw/``), so feedback
   accumulates across batches for the same concept;
2. validates all of them (size, encoding, JSON/CSV syntax, schema, image ids, image URLs,
   labels, annotation ids) and stops at the first problem with a one-line error naming the
   file, the record and the field; nothing has been written at that point;
3. only then writes: a byte-for-byte copy of each new source under ``raw/`` (named by its
   sha256, so the same export ingested twice counts once), then ``labels.parquet`` (binary) or
   ``pairs.parquet`` (ranking), each through a temporary file and an atomic rename.

Formats: Label Studio JSON (full), JSON_MIN and CSV exports; plain JSONL/CSV with
``image_id``, ``label`` (0/1 or a choice text) and ``annotator`` columns (``annotation_id``
optional), or ``image_ids`` (a list, strongest first) for rankings.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from hfi_core.feedback.labelstudio import (
    CONTROL,
    IMAGE,
    RANKER,
    FeedbackError,
    Ranking,
    Vote,
    annotator_of,
    choices_of,
    parse_full_export,
    parse_min_choice,
    ranking_of,
)

SAFE_ID = re.compile(r"^[A-Za-z0-9_.:-]+$")
FORMULA_PREFIXES = ("=", "+", "-", "@")
LABELS = "labels.parquet"
PAIRS = "pairs.parquet"
RAW = "raw"


@dataclass(frozen=True)
class IngestSettings:
    """What counts as a valid label. Built from ``FeedbackConfig`` by the caller."""

    kind: Literal["binary", "ranking"] = "binary"
    positive: str = "shows the concept"
    negative: str = "does not show the concept"
    image_store: str | None = None
    """When set, every image URL in an export must start with it (nothing is ever fetched)."""
    max_file_mb: float = 100.0


# ----------------------------------------------------------------------------- reading


def _read_text(path: Path, settings: IngestSettings) -> str:
    name = str(path)
    if not path.is_file():
        raise FeedbackError(name, None, None, "no such file")
    size = path.stat().st_size
    if size > settings.max_file_mb * 2**20:
        raise FeedbackError(name, None, None, f"{size / 2**20:.1f} MB is over the {settings.max_file_mb} MB limit")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FeedbackError(name, None, None, f"not UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})") from None
    if not text.strip():
        raise FeedbackError(name, None, None, "empty file")
    return text


def _check_cell(value: Any, source: str, record: int, field: str) -> str:
    text = "" if value is None else str(value)
    if text.startswith(FORMULA_PREFIXES):
        raise FeedbackError(
            source, record, field,
            f"{text[:40]!r} looks like a spreadsheet formula; cells starting with = + - @ are refused, never evaluated",
        )  # fmt: skip
    return text


def _rows_of(path: Path, text: str) -> tuple[str, Any]:
    """Detect the format: ``("full", tasks)``, ``("min", records)`` or ``("plain", records)``."""
    name = str(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            rows = list(reader)
        except csv.Error as e:
            raise FeedbackError(name, reader.line_num, None, f"invalid CSV: {e}") from None
        if not reader.fieldnames:
            raise FeedbackError(name, None, None, "CSV has no header row")
        return ("min" if "annotation_id" in reader.fieldnames else "plain"), rows
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise FeedbackError(name, i, None, f"invalid JSON: {e.msg} at column {e.colno}") from None
        return "plain", rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FeedbackError(
                name, None, None, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"
            ) from None
        if not isinstance(data, list):
            raise FeedbackError(
                name, None, None, f"expected a JSON array (a Label Studio export), got {type(data).__name__}"
            )
        if data and any(isinstance(t, dict) and ("data" in t or "annotations" in t) for t in data):
            return "full", data  # task-shaped: parse_full_export names any task that lacks 'data'
        if data and all(isinstance(t, dict) and "annotation_id" in t for t in data):
            return "min", data
        return "plain", data
    raise FeedbackError(name, None, None, f"unknown file type {suffix!r}; expected .json, .jsonl or .csv")


# ----------------------------------------------------------------------------- validation


class _Checker:
    """Checks ids, URLs and labels against the manifest and the settings."""

    def __init__(
        self, manifest: pd.DataFrame, settings: IngestSettings, elsewhere: frozenset[str] = frozenset()
    ) -> None:
        self.uri_of = dict(zip(manifest.image_id, manifest.uri, strict=True))
        self.s = settings
        self.elsewhere = elsewhere

    def image_id(self, value: Any, source: str, record: int, field: str) -> str:
        if not isinstance(value, str) or not value:
            raise FeedbackError(source, record, field, f"expected an image id string, got {value!r}")
        if "/" in value or "\\" in value or ".." in value or not SAFE_ID.match(value):
            raise FeedbackError(source, record, field, f"{value!r} is not a safe image id (no '/', '\\', '..')")
        if value not in self.uri_of and value not in self.elsewhere:
            raise FeedbackError(source, record, field, f"unknown image id {value!r} (not in the manifest)")
        return value

    def image_url(self, url: Any, image_id: str, source: str, record: int, field: str) -> None:
        if url is None or image_id not in self.uri_of:
            return
        if not isinstance(url, str):
            raise FeedbackError(source, record, field, f"expected a URL string, got {url!r}")
        if self.s.image_store is not None and not url.startswith(self.s.image_store):
            raise FeedbackError(
                source, record, field, f"{url!r} is outside the configured image store {self.s.image_store!r}"
            )
        if not url.split("?")[0].endswith(self.uri_of[image_id]) and not url.endswith(self.uri_of[image_id]):
            raise FeedbackError(source, record, field, f"{url!r} is not the file of image {image_id!r}")

    def label(self, choices: list[str], source: str, record: int, field: str) -> int:
        allowed = {self.s.positive: 1, self.s.negative: 0}
        if len(choices) != 1:
            raise FeedbackError(source, record, field, f"expected exactly one of {list(allowed)}, got {choices}")
        c = choices[0]
        if c in allowed:
            return allowed[c]
        raise FeedbackError(source, record, field, f"label {c!r} is not one of {list(allowed)}")


def _plain_label(value: Any, check: _Checker, source: str, record: int) -> int:
    if value in (0, 1) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    return check.label([str(value)], source, record, "label")


def parse_source(
    path: Path, manifest: pd.DataFrame, settings: IngestSettings, elsewhere: frozenset[str] = frozenset()
) -> list[Vote] | list[Ranking]:
    """Parse and validate one export. Raises ``FeedbackError`` at the first problem.

    ``elsewhere``: image ids drawn on other nights (the image pool's), valid but not in ``manifest``.
    """
    name = str(path)
    text = _read_text(path, settings)
    fmt, rows = _rows_of(path, text)
    check = _Checker(manifest, settings, elsewhere)
    out: list = []
    csv_file = path.suffix.lower() == ".csv"

    def cell(row: dict, key: str, i: int) -> str:
        return _check_cell(row.get(key), name, i, key) if csv_file else row.get(key)

    if fmt == "full":
        annotations, _skipped = parse_full_export(rows, name)
        for i, data, ann in annotations:
            ann_id, who = str(ann["id"]), annotator_of(ann)
            if settings.kind == "binary":
                image_id = check.image_id(data.get("image_id"), name, i, "data.image_id")
                check.image_url(data.get(IMAGE), image_id, name, i, f"data.{IMAGE}")
                label = check.label(choices_of(ann, name, i, CONTROL), name, i, f"result[{CONTROL}].choices")
                when = ann.get("updated_at") if isinstance(ann.get("updated_at"), str) else None
                out.append(Vote(name, i, ann_id, who, image_id, label, when))
            else:
                order = ranking_of(ann, name, i, RANKER)
                ids = tuple(check.image_id(x, name, i, "result.value.ranker") for x in order)
                out.append(Ranking(name, i, ann_id, who, ids))
    else:
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise FeedbackError(name, i, None, f"expected an object, got {type(row).__name__}")
            if fmt == "min":
                ann_id = cell(row, "annotation_id", i)
                who = cell(row, "annotator", i)
                if ann_id in (None, ""):
                    raise FeedbackError(name, i, "annotation_id", "missing")
                if settings.kind == "ranking":
                    raise FeedbackError(name, i, None, "rankings are read from the full JSON export only")
                image_id = check.image_id(cell(row, "image_id", i), name, i, "image_id")
                check.image_url(row.get(IMAGE), image_id, name, i, IMAGE)
                choices = parse_min_choice(row.get(CONTROL), name, i, CONTROL)
                if csv_file:
                    choices = [_check_cell(c, name, i, CONTROL) for c in choices]
                if not choices:
                    continue  # an empty result is no label
                out.append(Vote(name, i, str(ann_id), str(who), image_id, check.label(choices, name, i, CONTROL)))
            elif settings.kind == "ranking":
                ids = row.get("image_ids")
                if isinstance(ids, str):
                    ids = ids.split()
                if not isinstance(ids, list) or len(ids) < 2:
                    raise FeedbackError(
                        name, i, "image_ids", "expected a list of at least 2 image ids, strongest first"
                    )
                ids = tuple(check.image_id(x, name, i, "image_ids") for x in ids)
                out.append(
                    Ranking(name, i, str(row.get("annotation_id") or f"{name}#{i}"), str(row.get("annotator")), ids)
                )
            else:
                for key in ("image_id", "label", "annotator"):
                    if row.get(key) in (None, ""):
                        raise FeedbackError(name, i, key, "missing")
                image_id = check.image_id(cell(row, "image_id", i), name, i, "image_id")
                label = _plain_label(cell(row, "label", i), check, name, i)
                ann_id = str(cell(row, "annotation_id", i) or f"{Path(name).name}#{i}")
                out.append(Vote(name, i, ann_id, str(cell(row, "annotator", i)), image_id, label))
    if not out:
        raise FeedbackError(name, None, None, "no human labels (only predictions, cancelled or empty annotations)")
    return out


# ----------------------------------------------------------------------------- aggregation


def aggregate_votes(votes: list[Vote]) -> pd.DataFrame:
    """One row per image: mean label, majority, votes, annotators, agreement with the majority.

    The same annotation id seen twice (overlapping exports) counts once. Seen with two different
    labels, the later ``updated_at`` wins where both exports carry one (an edit in Label Studio);
    otherwise it is a contradiction and an error.
    """
    by_id: dict[str, Vote] = {}
    for v in votes:
        prev = by_id.get(v.annotation_id)
        if (
            prev is not None and prev.image_id == v.image_id and prev.updated_at and v.updated_at
            and prev.updated_at != v.updated_at
        ):  # fmt: skip
            # The same annotation in two exports: an annotator edited it; the later save wins.
            if v.updated_at > prev.updated_at:
                by_id[v.annotation_id] = v
            continue
        if prev is not None and (prev.label != v.label or prev.image_id != v.image_id):
            raise FeedbackError(
                v.source, v.record, "annotation_id",
                f"annotation {v.annotation_id!r} appears twice with different labels "
                f"({prev.source} record {prev.record}: {prev.image_id}={prev.label}; here: {v.image_id}={v.label})",
            )  # fmt: skip
        by_id[v.annotation_id] = v
    per_image: dict[str, list[Vote]] = defaultdict(list)
    for v in by_id.values():
        per_image[v.image_id].append(v)
    rows = []
    for image_id, vs in sorted(per_image.items()):
        labels = [v.label for v in vs]
        mean = sum(labels) / len(labels)
        majority = int(mean >= 0.5)
        rows.append(
            {
                "image_id": image_id,
                "label": mean,
                "majority": majority,
                "n_votes": len(labels),
                "n_annotators": len({v.annotator for v in vs}),
                "agreement": sum(lab == majority for lab in labels) / len(labels),
            }
        )
    return pd.DataFrame(rows, columns=["image_id", "label", "majority", "n_votes", "n_annotators", "agreement"])


def expand_rankings(rankings: list[Ranking]) -> pd.DataFrame:
    """Every ranking of M images -> M(M-1)/2 pairs (``image_pos`` ranked above ``image_neg``)."""
    seen: dict[str, Ranking] = {}
    rows = []
    for r in rankings:
        prev = seen.get(r.annotation_id)
        if prev is not None:
            if prev.image_ids != r.image_ids:
                raise FeedbackError(
                    r.source,
                    r.record,
                    "annotation_id",
                    f"annotation {r.annotation_id!r} appears twice with different orders",
                )
            continue
        seen[r.annotation_id] = r
        for a in range(len(r.image_ids)):
            for b in range(a + 1, len(r.image_ids)):
                rows.append(
                    {
                        "image_pos": r.image_ids[a],
                        "image_neg": r.image_ids[b],
                        "annotator": r.annotator,
                        "annotation_id": r.annotation_id,
                    }
                )
    return pd.DataFrame(rows, columns=["image_pos", "image_neg", "annotator", "annotation_id"])


# ----------------------------------------------------------------------------- the transaction


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _raw_name(path: Path, sha: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)
    return f"{sha[:16]}-{safe}"


def ingest(
    manifest: pd.DataFrame,
    sources: list[Path],
    out: Path,
    settings: IngestSettings,
    elsewhere: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Validate ``sources`` together with earlier ones under ``out/raw`` and write the labels.

    Labels of images in ``elsewhere`` (drawn on another night, not in this night's ``manifest``)
    are valid but not used: they are counted as ``labels_outside_batch``. Returns a summary
    (files, votes or pairs, images). Raises ``FeedbackError`` before writing anything when any
    source is bad.
    """
    out = Path(out)
    earlier = sorted((out / RAW).glob("*")) if (out / RAW).is_dir() else []
    known = {p.name.split("-", 1)[0] for p in earlier}
    new: list[tuple[Path, str]] = []
    for src in sources:
        src = Path(src)
        if not src.is_file():
            raise FeedbackError(str(src), None, None, "no such file")
        sha = _sha256(src)
        if sha[:16] not in known and all(sha != s for _, s in new):
            new.append((src, sha))
    # Parse everything first: nothing is written unless every source is valid.
    parsed = []
    for path in [*earlier, *(p for p, _ in new)]:
        parsed += parse_source(path, manifest, settings, elsewhere)
    in_batch = set(manifest.image_id)
    kept = [x for x in parsed if all(i in in_batch for i in (x.image_ids if isinstance(x, Ranking) else [x.image_id]))]
    outside, parsed = len(parsed) - len(kept), kept
    if settings.kind == "binary":
        table, name = aggregate_votes(parsed), LABELS
    else:
        table, name = expand_rankings(parsed), PAIRS

    (out / RAW).mkdir(parents=True, exist_ok=True)
    for src, sha in new:
        dest = out / RAW / _raw_name(src, sha)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    tmp = out / f".{name}.tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, out / name)
    summary = {
        "kind": settings.kind,
        "sources": len(earlier) + len(new),
        "new_sources": len(new),
        "labels": len({x.annotation_id for x in parsed}),  # an annotation two exports hold counts once
        "labels_outside_batch": outside,
        "rows": len(table),
        "output": str(out / name),
    }
    if settings.kind == "binary" and len(table):
        summary["mean_agreement"] = float(table.agreement.mean())
        summary["positive_share"] = float(table.majority.mean())
    return summary
