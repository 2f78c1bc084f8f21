"""The GPU device check runs its every measurement on a CPU with --tiny (the numbers mean nothing
there; that the script works, measures what it says and writes its JSON is what is checked)."""

import json

from benchmarks.gpu.device_check import main


def test_tiny_device_check_measures_every_stage_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu.json"
    assert main(["--tiny", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["tiny"] is True and r["versions"]["torch"] and "--tiny" in r["command"]
    assert [g["batch"] for g in r["generation"]] == [8, 16]
    for g in r["generation"]:
        assert g["hfi_images_per_s"] > 0 and g["diffusers_images_per_s"] > 0
        assert g["same_bytes"] is True  # the library's sampling loop is diffusers' call, byte for byte
    assert [i["gradient_checkpointing"] for i in r["inversion"]] == [False, True]
    assert all(i["s_per_step"] > 0 for i in r["inversion"])
    assert [d["method"] for d in r["distill"]] == ["sdd", "esd"]
    for d in r["distill"]:
        assert d["s_per_step"] > 0 and d["gflops_per_step"] > 0 and d["mfu"] is None  # no peak known for a CPU
    assert r["evaluation"]["clip_images_per_s"] > 0 and r["evaluation"]["nudenet_images_per_s"] > 0
