"""Feedback ingest: every export shape gives the same labels; bad input writes nothing."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from hfi_core.feedback.ingest import LABELS, PAIRS, IngestSettings, ingest
from hfi_core.feedback.labelstudio import FeedbackError
from tasks.cli import main as hfi

FIXTURES = Path(__file__).parents[1] / "fixtures" / "labelstudio"
SETTINGS = IngestSettings(positive="striped", negative="not striped")


@pytest.fixture
def manifest():
    ids = ["img_a", "img_b", "img_c", "img_d"]
    uris = [f"images/{c * 3}.png" for c in "abcd"]
    return pd.DataFrame({"image_id": ids, "uri": uris})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["full_export.json", "min_export.json", "csv_export.csv"])
def test_every_label_studio_export_shape_parses_to_the_same_labels(manifest, tmp_path, name):
    ingest(manifest, [FIXTURES / name], tmp_path, SETTINGS)
    labels = pd.read_parquet(tmp_path / LABELS).set_index("image_id")
    # img_a: two yes (a cancelled no does not count, nor the model's prediction)
    # img_b: no, no (with another control's choices beside it), yes
    # img_c: an empty result does not count; one yes
    # img_d: only a prediction, so no label at all
    assert labels.index.tolist() == ["img_a", "img_b", "img_c"]
    assert labels.n_votes.tolist() == [2, 3, 1]
    assert labels.n_annotators.tolist() == [2, 3, 1]
    assert labels.majority.tolist() == [1, 0, 1]
    assert labels.label.tolist() == pytest.approx([1.0, 1 / 3, 1.0])
    assert labels.agreement.tolist() == pytest.approx([1.0, 2 / 3, 1.0])


def test_raw_sources_are_kept_byte_for_byte_and_a_repeat_counts_once(manifest, tmp_path):
    src = FIXTURES / "full_export.json"
    first = ingest(manifest, [src], tmp_path, SETTINGS)
    again = ingest(manifest, [src], tmp_path, SETTINGS)
    raws = list((tmp_path / "raw").iterdir())
    assert len(raws) == 1 and raws[0].read_bytes() == src.read_bytes()
    assert (first["labels"], again["labels"], again["new_sources"]) == (6, 6, 0)


def test_a_later_batch_adds_to_the_earlier_labels(manifest, tmp_path):
    ingest(manifest, [FIXTURES / "full_export.json"], tmp_path, SETTINGS)
    later = tmp_path / "later.jsonl"
    later.write_text(
        json.dumps({"image_id": "img_d", "label": 1, "annotator": "dee", "annotation_id": "n1"})
        + "\n"
        + json.dumps({"image_id": "img_c", "label": "not striped", "annotator": "dee", "annotation_id": "n2"})
        + "\n"
    )
    ingest(manifest, [later], tmp_path, SETTINGS)
    labels = pd.read_parquet(tmp_path / LABELS).set_index("image_id")
    assert labels.index.tolist() == ["img_a", "img_b", "img_c", "img_d"]
    assert labels.loc["img_c", "n_votes"] == 2 and labels.loc["img_c", "label"] == 0.5
    assert labels.loc["img_d", "label"] == 1.0
    assert len(list((tmp_path / "raw").iterdir())) == 2


def test_overlapping_exports_count_an_annotation_once(manifest, tmp_path):
    ingest(manifest, [FIXTURES / "full_export.json", FIXTURES / "min_export.json"], tmp_path, SETTINGS)
    labels = pd.read_parquet(tmp_path / LABELS).set_index("image_id")
    assert labels.n_votes.tolist() == [2, 3, 1]


def test_rankings_expand_into_ordered_pairs_and_ignore_cancelled_and_predictions(manifest, tmp_path):
    ingest(manifest, [FIXTURES / "ranking_export.json"], tmp_path, IngestSettings(kind="ranking"))
    pairs = pd.read_parquet(tmp_path / PAIRS)
    got = sorted(zip(pairs.image_pos, pairs.image_neg, strict=True))
    assert got == sorted([("img_c", "img_a"), ("img_c", "img_b"), ("img_a", "img_b")])


def _bad(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / "in" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def _task(image_id="img_a", choice="striped", ann_id=1, url="/data/local-files/?d=/srv/images/aaa.png"):
    result = [{"type": "choices", "from_name": "concept", "to_name": "image", "value": {"choices": [choice]}}]
    data = {"image_id": image_id, "image": url}
    return {"id": 1, "data": data, "annotations": [{"id": ann_id, "completed_by": 1, "result": result}]}


BAD_CASES = {
    "invalid_json": ("a.json", "[{", r"a\.json: invalid JSON: Expecting property name"),
    "wrong_schema": ("a.json", '{"tasks": []}', r"a\.json: expected a JSON array"),
    "task_without_data": ("a.json", '[{"id": 1, "annotations": []}]', r"a\.json: record 0, field 'data'"),
    "unknown_image_id": ("a.json", json.dumps([_task("img_zzz")]), r"record 0, field 'data.image_id': unknown image id 'img_zzz'"),
    "slash_in_id": ("a.json", json.dumps([_task("x/../img_a")]), r"field 'data.image_id': 'x/../img_a' is not a safe image id"),
    "backslash_in_id": ("a.json", json.dumps([_task("img\\a")]), r"is not a safe image id"),
    "dotdot_in_id": ("a.jsonl", '{"image_id": "..", "label": 1, "annotator": "a"}\n', r"record 0, field 'image_id': '\.\.' is not a safe"),
    "label_outside_set": ("a.json", json.dumps([_task(choice="maybe")]), r"label 'maybe' is not one of \['striped', 'not striped'\]"),
    "no_human_labels": (
        "a.json",
        json.dumps([{"id": 1, "data": {"image_id": "img_a"}, "annotations": [{"id": 5, "was_cancelled": True, "result": [1]}],
                     "predictions": [{"result": [{"type": "choices", "from_name": "concept", "value": {"choices": ["striped"]}}]}]}]),
        r"a\.json: no human labels",
    ),
    "empty_file": ("a.json", "", r"a\.json: empty file"),
    "whitespace_file": ("a.csv", "  \n", r"a\.csv: empty file"),
    "not_utf8": ("a.csv", b"image_id,label,annotator\nimg_a,\xff\xfe,al\n", r"a\.csv: not UTF-8 \(byte 31: b'\\xff'\)"),
    "csv_formula_label": ("a.csv", "image_id,label,annotator\nimg_a,=1+1,al\n", r"record 0, field 'label': '=1\+1' looks like a spreadsheet formula"),
    "csv_formula_id": ("a.csv", "image_id,label,annotator\n@SUM(A1),1,al\n", r"field 'image_id': '@SUM\(A1\)' looks like a spreadsheet formula"),
    "csv_formula_min": (
        "a.csv", "image_id,concept,annotator,annotation_id\nimg_a,+striped,al,1\n", r"field 'concept': '\+striped' looks like a spreadsheet formula",
    ),
    "url_outside_store": ("a.json", json.dumps([_task(url="https://elsewhere.example/aaa.png")]), r"is outside the configured image store"),
    "url_of_another_image": ("a.json", json.dumps([_task(url="/data/local-files/?d=/srv/images/bbb.png")]), r"is not the file of image 'img_a'"),
    "unknown_suffix": ("a.txt", "x", r"unknown file type '\.txt'"),
    "missing_field": ("a.jsonl", '{"image_id": "img_a", "annotator": "al"}\n', r"record 0, field 'label': missing"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_refused_with_file_record_field_and_nothing_is_written(manifest, tmp_path, case):
    name, content, message = BAD_CASES[case]
    src = _bad(tmp_path, name, content)
    settings = IngestSettings(positive="striped", negative="not striped", image_store="/data/local-files/")
    out = tmp_path / "out"
    with pytest.raises(FeedbackError, match=message) as e:
        ingest(manifest, [src], out, settings)
    assert str(src) in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()
    assert src.read_bytes() == (content if isinstance(content, bytes) else content.encode())  # raw input untouched


def test_a_file_over_the_size_limit_is_refused(manifest, tmp_path):
    src = _bad(tmp_path, "big.json", "[" + " " * 3000 + "]")
    with pytest.raises(FeedbackError, match=r"big\.json: 0\.0 MB is over the 0\.001 MB limit"):
        ingest(manifest, [src], tmp_path / "out", IngestSettings(max_file_mb=0.001))
    assert not (tmp_path / "out").exists()


def test_one_annotation_id_with_two_labels_is_refused_and_earlier_outputs_stay(manifest, tmp_path):
    out = tmp_path / "out"
    ingest(manifest, [FIXTURES / "full_export.json"], out, SETTINGS)
    before = _snapshot(out)
    clash = _bad(
        tmp_path, "clash.jsonl", '{"image_id": "img_a", "label": 0, "annotator": "1", "annotation_id": "11"}\n'
    )
    with pytest.raises(FeedbackError, match=r"annotation '11' appears twice with different labels"):
        ingest(manifest, [clash], out, SETTINGS)
    assert _snapshot(out) == before


def test_a_bad_file_among_good_ones_writes_nothing(manifest, tmp_path):
    bad = _bad(tmp_path, "bad.json", "[{")
    out = tmp_path / "out"
    with pytest.raises(FeedbackError):
        ingest(manifest, [FIXTURES / "full_export.json", bad], out, SETTINGS)
    assert not out.exists()


def test_cli_prints_one_line_and_exits_2_on_bad_input(tmp_path, capsys, manifest):
    from hfi_core.store import LocalStore

    run = tmp_path / "run"
    (run / "generate").mkdir(parents=True)
    full = manifest.assign(
        sha256="0", prompt="p", group="target", index=0, seed=0, model="m", scheduler="s", steps=1, guidance=1.0,
        negative_prompt=None, sld=None, width=32, height=32,
    )  # fmt: skip
    full.to_parquet(run / "generate" / "manifest.parquet")
    LocalStore(str(tmp_path)).mark_success("run/generate", {}, {"manifest.parquet": "0" * 64})  # generate finished
    config = tmp_path / "run.yaml"
    config.write_text("name: x\nconcept: {name: c}\nmodel: {path: m}\nprompts: [{group: target, prompts: [p]}]\n")
    bad = _bad(tmp_path, "bad.json", "[{")
    code = hfi(["feedback", "ingest", "--config", str(config), "--run", str(run), "--source", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith(f"hfi: error: {bad}: invalid JSON")
    assert not (run / "feedback").exists()
    shutil.rmtree(tmp_path / "in")


@pytest.mark.parametrize("order", ["earlier first", "later first"])
def test_an_annotation_edited_in_label_studio_counts_with_its_later_label(manifest, tmp_path, order):
    # Two pulls of the same project: between them an annotator changed annotation 41 from
    # striped to not striped. The export with the later updated_at wins, in either order.
    def export(label: str, when: str) -> list[dict]:
        ann = {"id": 41, "completed_by": 4, "was_cancelled": False, "updated_at": when,
               "result": [{"type": "choices", "from_name": "concept", "value": {"choices": [label]}}]}  # fmt: skip
        return [{"id": 1, "data": {"image_id": "img_b"}, "annotations": [ann]}]

    first = tmp_path / "pull1.json"
    first.write_text(json.dumps(export("striped", "2026-11-01T10:00:00.000000Z")))
    second = tmp_path / "pull2.json"
    second.write_text(json.dumps(export("not striped", "2026-11-02T09:00:00.000000Z")))
    sources = [first, second] if order == "earlier first" else [second, first]
    summary = ingest(manifest, sources, tmp_path / "out", SETTINGS)
    labels = pd.read_parquet(tmp_path / "out" / LABELS).set_index("image_id")
    assert labels.loc["img_b", "label"] == 0 and labels.loc["img_b", "n_votes"] == 1
    assert summary["labels"] == 1
    # The same time with two labels is a contradiction, not an edit.
    clash = tmp_path / "pull3.json"
    clash.write_text(json.dumps(export("striped", "2026-11-02T09:00:00.000000Z")))
    with pytest.raises(FeedbackError, match=r"annotation '41' appears twice with different labels"):
        ingest(manifest, [second, clash], tmp_path / "out2", SETTINGS)


def test_a_feedback_error_crosses_a_process_boundary_whole():
    # The benchmark runs steps in worker processes: their errors must unpickle in the parent,
    # as the one line that names the file, record and field.
    import pickle

    e = FeedbackError("exports/night.json", 7, "result", "no 'ranker' result")
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is FeedbackError and str(again) == str(e)
    assert str(again) == "exports/night.json: record 7, field 'result': no 'ranker' result"
