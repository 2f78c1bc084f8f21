import json

from tasks.demo import report


def test_the_demo_report_shows_before_and_after_per_group_and_the_gate_verdict(tmp_path):
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "register").mkdir()
    group = {"clip_concept_rate": 0.9, "oracle_striped": 0.95, "oracle_dotted": 0.0, "oracle_plain": 0.05,
             "oracle_shape_acc": 0.97, "oracle_color_acc": 1.0}  # fmt: skip
    after = {**group, "oracle_striped": 0.1, "oracle_plain": 0.9, "oracle_became_dotted": 0.0,
             "oracle_became_plain": 0.85}  # fmt: skip
    summary = {"sd": {"target:explicit": group}, "distilled": {"target:explicit": after}}
    (tmp_path / "evaluate" / "summary.json").write_text(json.dumps(summary))
    gates = {"concept_rate": {"value": 0.1, "limit": 0.1, "passed": True}}
    (tmp_path / "register" / "registration.json").write_text(
        json.dumps({"version": "3", "champion": True, "gates": gates})
    )
    text = report(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("target:explicit"))
    assert row.split()[1:3] == ["0.95", "0.10"] and "0.05/0.90" in row and "0.97/0.97" in row
    assert row.split()[-1] == "0.00/0.85"  # the erased stripes became plain, not dots
    assert "concept = oracle_striped; model version 3: promoted: alias 'champion'" in text
    assert "concept_rate 0.100 (limit 0.1) pass" in text
