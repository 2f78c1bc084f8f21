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
import os
import re
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
    shown,
    strict_json,
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


MAX_VALUES = 4_000_000
"""Values (counted by separators: commas, newlines, braces, brackets) an export may hold: a 100 MB
file of a million tiny objects would otherwise need several GB once parsed. A Label Studio
export of 100,000 tasks holds about 3 million."""
MAX_RANKED = 50
"""Images one ranking may order (its pairs grow as the square)."""
MAX_PAIRS = 2_000_000
"""Pairs all rankings together may expand to."""


def read_source(path: Path, settings: IngestSettings) -> bytes:
    """An export's bytes, read once: the size is checked before reading, so a huge file is never
    read; every later step (hash, parse, raw copy) uses these same bytes."""
    name = str(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise FeedbackError(name, None, None, "no such file") from None
    if not path.is_file():
        raise FeedbackError(name, None, None, "not a regular file")
    if size > settings.max_file_mb * 2**20:
        raise FeedbackError(name, None, None, f"{size / 2**20:.1f} MB is over the {settings.max_file_mb} MB limit")
    with open(path, "rb") as f:
        return f.read(int(settings.max_file_mb * 2**20) + 1)  # a file that grew meanwhile is cut, then refused


def _decode(raw: bytes, name: str, settings: IngestSettings) -> str:
    if len(raw) > settings.max_file_mb * 2**20:
        raise FeedbackError(name, None, None, f"over the {settings.max_file_mb} MB limit")
    values = raw.count(b",") + raw.count(b"\n") + raw.count(b"{") + raw.count(b"[")
    if values > MAX_VALUES:
        raise FeedbackError(name, None, None, f"about {values} values, over the {MAX_VALUES} an export may hold")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FeedbackError(name, None, None, f"not UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})") from None
    if "\x00" in text:
        raise FeedbackError(name, None, None, "contains a NUL character: not a text export")
    if not text.strip():
        raise FeedbackError(name, None, None, "empty file")
    return text


def _check_cell(value: Any, source: str, record: int, field: str) -> str:
    text = "" if value is None else str(value)
    if text.startswith(FORMULA_PREFIXES):
        raise FeedbackError(
            source, record, field,
            f"{shown(text, 40)} looks like a spreadsheet formula; cells starting with = + - @ are refused",
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
        if len(set(reader.fieldnames)) != len(reader.fieldnames):
            raise FeedbackError(name, 0, None, "a column name appears twice in the header")
        for i, row in enumerate(rows):
            if None in row:  # csv.DictReader's key for cells beyond the header
                raise FeedbackError(name, i, None, f"{len(reader.fieldnames) + len(row[None])} cells, but "
                                    f"{len(reader.fieldnames)} columns in the header")  # fmt: skip
        return ("min" if "annotation_id" in reader.fieldnames else "plain"), rows
    if suffix == ".jsonl":
        rows = []
        # Records end at "\n" only: str.splitlines() would also cut at U+2028, U+0085 and other
        # characters JSON allows inside strings.
        for i, line in enumerate(text.split("\n")):
            if line.strip():
                rows.append(strict_json(line.removesuffix("\r"), name, i))
        return "plain", rows
    if suffix == ".json":
        data = strict_json(text, name)
        if not isinstance(data, list):
            raise FeedbackError(
                name, None, None, f"expected a JSON array (a Label Studio export), got {type(data).__name__}"
            )
        if data and any(isinstance(t, dict) and ("data" in t or "annotations" in t) for t in data):
            return "full", data  # task-shaped: parse_full_export names any task that lacks 'data'
        if data and all(isinstance(t, dict) and "annotation_id" in t for t in data):
            return "min", data
        return "plain", data
    raise FeedbackError(name, None, None, f"unknown file type {shown(suffix, 20)}; expected .json, .jsonl or .csv")


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
            raise FeedbackError(source, record, field, f"expected an image id string, got {shown(value)}")
        if "/" in value or "\\" in value or ".." in value or not SAFE_ID.match(value):
            raise FeedbackError(source, record, field, f"{shown(value)} is not a safe image id (no '/', '\\', '..')")
        if value not in self.uri_of and value not in self.elsewhere:
            raise FeedbackError(source, record, field, f"unknown image id {shown(value)} (not in the manifest)")
        return value

    def image_url(self, url: Any, image_id: str, source: str, record: int, field: str) -> None:
        if url is None or image_id not in self.uri_of:
            return
        if not isinstance(url, str):
            raise FeedbackError(source, record, field, f"expected a URL string, got {shown(url)}")
        if self.s.image_store is not None and not url.startswith(self.s.image_store):
            raise FeedbackError(
                source, record, field, f"{shown(url)} is outside the configured image store {shown(self.s.image_store)}"
            )
        if not url.split("?")[0].endswith(self.uri_of[image_id]) and not url.endswith(self.uri_of[image_id]):
            raise FeedbackError(source, record, field, f"{shown(url)} is not the file of image {shown(image_id)}")

    def label(self, choices: list[str], source: str, record: int, field: str) -> int:
        allowed = {self.s.positive: 1, self.s.negative: 0}
        if len(choices) != 1:
            got = shown(choices[:3])
            raise FeedbackError(source, record, field, f"expected exactly one of {list(allowed)}, got {got}")
        c = choices[0]
        if c in allowed:
            return allowed[c]
        raise FeedbackError(source, record, field, f"label {shown(c)} is not one of {list(allowed)}")


def _ranked(order: list[Any], check: _Checker, source: str, record: int, field: str) -> tuple[str, ...]:
    """A ranking's valid ids: at most ``MAX_RANKED`` of them (counted first), each at most once (a
    repeated id would pair an image with itself)."""
    if len(order) > MAX_RANKED:
        raise FeedbackError(source, record, field, f"{len(order)} images in one ranking; at most {MAX_RANKED}")
    ids = tuple(check.image_id(x, source, record, field) for x in order)
    if len(set(ids)) != len(ids):
        dup = next(x for i, x in enumerate(ids) if x in ids[:i])
        raise FeedbackError(source, record, field, f"image {shown(dup)} is ranked twice in one ranking")
    return ids


def _plain_label(value: Any, check: _Checker, source: str, record: int) -> int:
    if value in (0, 1) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    return check.label([str(value)], source, record, "label")


def parse_source(
    path: Path,
    manifest: pd.DataFrame,
    settings: IngestSettings,
    elsewhere: frozenset[str] = frozenset(),
    data: bytes | None = None,
) -> list[Vote] | list[Ranking]:
    """Parse and validate one export. Raises ``FeedbackError`` at the first problem.

    ``elsewhere``: image ids drawn on other nights (the image pool's), valid but not in ``manifest``.
    ``data``: the export's bytes when already read (``read_source``); ``path`` then only names it.
    """
    name = str(path)
    text = _decode(read_source(Path(path), settings) if data is None else data, name, settings)
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
                ids = _ranked(order, check, name, i, "result.value.ranker")
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
                ids = _ranked(ids, check, name, i, "image_ids")
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
                f"annotation {shown(v.annotation_id)} appears twice with different labels "
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
                    f"annotation {shown(r.annotation_id)} appears twice with different orders",
                )
            continue
        seen[r.annotation_id] = r
        if len(rows) + len(r.image_ids) * (len(r.image_ids) - 1) // 2 > MAX_PAIRS:
            raise FeedbackError(r.source, r.record, None, f"the rankings expand to more than {MAX_PAIRS} pairs")
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


def _raw_name(path: Path, sha: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)[-80:]
    return f"{sha[:16]}-{safe}"


def _write_atomic(dest: Path, write: Any) -> None:
    """``write(file)`` into a uniquely named temporary file beside ``dest``, fsynced, then renamed
    over ``dest``: a reader sees the old file or the whole new one, and two writers never share a
    temporary name. A temporary left by a kill starts with "." and ends with ".tmp"."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    if (out / RAW).is_dir():  # what a killed ingest left: never read, and removed
        for leftover in (out / RAW).glob(".*"):
            leftover.unlink(missing_ok=True)
    earlier = sorted((out / RAW).glob("[!.]*")) if (out / RAW).is_dir() else []
    known = {p.name.split("-", 1)[0] for p in earlier}
    # Every source is read once: the bytes hashed are the bytes parsed and the bytes copied.
    new: list[tuple[Path, str, bytes]] = []
    for src in map(Path, sources):
        data = read_source(src, settings)
        sha = hashlib.sha256(data).hexdigest()
        if sha[:16] not in known and all(sha != s for _, s, _ in new):
            new.append((src, sha, data))
    # Parse everything first: nothing is written unless every source is valid.
    parsed = []
    for path in earlier:
        parsed += parse_source(path, manifest, settings, elsewhere)
    for path, _, data in new:
        parsed += parse_source(path, manifest, settings, elsewhere, data=data)
    in_batch = set(manifest.image_id)
    kept = [x for x in parsed if all(i in in_batch for i in (x.image_ids if isinstance(x, Ranking) else [x.image_id]))]
    outside, parsed = len(parsed) - len(kept), kept
    if settings.kind == "binary":
        table, name = aggregate_votes(parsed), LABELS
    else:
        table, name = expand_rankings(parsed), PAIRS

    (out / RAW).mkdir(parents=True, exist_ok=True)
    for src, sha, data in new:
        _write_atomic(out / RAW / _raw_name(src, sha), lambda f, data=data: f.write(data))
    _write_atomic(out / name, lambda f: table.to_parquet(f, index=False))
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
