"""Hostile feedback files are refused: one line of at most 300 characters naming the file, within
5 s, with peak memory under 1.5 GB, and nothing written. Valid but unusual files are accepted.

Each hostile file is ingested in a forked child, so that its time and peak RSS are its own
(``os.wait4``) and a hang or a crash cannot take the test run with it.
"""

import os
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from hfi_core.feedback.ingest import LABELS, IngestSettings, ingest

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures"))
from hostile_feedback import HOSTILE, IDS, NEGATIVE, POSITIVE, UNUSUAL, URIS  # noqa: E402

MANIFEST = pd.DataFrame({"image_id": IDS, "uri": URIS})
FIXTURES = Path(__file__).parents[1] / "fixtures" / "labelstudio"


def _settings(kind: str) -> IngestSettings:
    return IngestSettings(kind=kind, positive=POSITIVE, negative=NEGATIVE, image_store="s3://hfi/")


def _ingest_in_child(path: Path, out: Path, kind: str) -> tuple[int, str, float, float]:
    """(exit code, what it printed, seconds, peak RSS in MB) of ingesting ``path`` in a fork."""
    read, write = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: ingest, report the error line, exit without pytest's teardown
        os.close(read)
        code, text = 0, "accepted"
        try:
            ingest(MANIFEST, [path], out, _settings(kind))
        except ValueError as e:  # FeedbackError: the refusal we want
            code, text = 2, str(e)
        except BaseException as e:  # anything else is a defect
            code, text = 1, f"{type(e).__name__}: {str(e)[:500]}"
        os.write(write, text.encode()[:4096])
        os._exit(code)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 4096):
        chunks.append(chunk)
    os.close(read)
    _, status, usage = os.wait4(pid, 0)
    return (
        os.waitstatus_to_exitcode(status),
        b"".join(chunks).decode(),
        time.perf_counter() - t0,
        usage.ru_maxrss / 1024,
    )


def test_the_corpus_is_big_enough():
    assert len(HOSTILE) >= 40 and len({name for name, _, _ in HOSTILE}) == len(HOSTILE)


@pytest.mark.parametrize(("name", "kind", "write"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_hostile_file_is_refused_in_one_short_line_quickly_and_nothing_is_written(tmp_path, name, kind, write):
    (tmp_path / "in").mkdir()
    path = write(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    code, text, seconds, rss_mb = _ingest_in_child(path, out, kind)
    assert code == 2, f"{name}: not refused cleanly: {text}"
    assert "\n" not in text and len(text) <= 300, f"{name}: {len(text)} characters: {text[:400]}"
    assert path.name in text, f"{name}: the message does not name the file: {text}"
    assert seconds < 5, f"{name}: {seconds:.1f} s"
    assert rss_mb < 1536, f"{name}: peak RSS {rss_mb:.0f} MB"
    assert not list(out.rglob("*")), f"{name}: wrote {list(out.rglob('*'))}"


@pytest.mark.parametrize(("name", "write"), UNUSUAL, ids=[c[0] for c in UNUSUAL])
def test_valid_but_unusual_files_are_accepted(tmp_path, name, write):
    path = write(tmp_path)
    summary = ingest(MANIFEST, [path], tmp_path / "out", _settings("binary"))
    labels = pd.read_parquet(tmp_path / "out" / LABELS).set_index("image_id")
    assert summary["labels"] == 2 and labels.loc["img_a", "majority"] == 1 and labels.loc["img_b", "majority"] == 0
    assert next((tmp_path / "out" / "raw").iterdir()).read_bytes() == path.read_bytes()  # the very bytes


def test_the_genuine_label_studio_export_is_accepted(tmp_path):
    summary = ingest(MANIFEST, [FIXTURES / "full_export.json"], tmp_path, IngestSettings(positive=POSITIVE,
                                                                                       negative=NEGATIVE))  # fmt: skip
    assert summary["labels"] == 6


def test_a_temporary_file_left_by_a_killed_ingest_is_ignored_and_removed(tmp_path):
    ingest(MANIFEST, [FIXTURES / "full_export.json"], tmp_path, IngestSettings(positive=POSITIVE, negative=NEGATIVE))
    leftover = tmp_path / "raw" / ".0123456789abcdef-later.json.x1y2.tmp"
    leftover.write_bytes(b'[{"data": ')  # half a copy
    again = ingest(MANIFEST, [FIXTURES / "full_export.json"], tmp_path, IngestSettings(positive=POSITIVE,
                                                                                      negative=NEGATIVE))  # fmt: skip
    assert again["labels"] == 6 and not leftover.exists()
