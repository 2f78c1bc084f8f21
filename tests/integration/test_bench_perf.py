"""`hfi bench perf`: the smoke run CI pays for (every section, tiny sizes), and the full SDD
comparison's bookkeeping on a few steps: checkpoints judged in order, the speedup only at equal
removal. Nothing here is a speed measurement; benchmarks/results/perf.md holds those."""

import json
from pathlib import Path

import pytest

from benchmarks.perf import EQUAL_REMOVAL, bench_sdd, sdd_configs, worse_by
from benchmarks.removal import load_bench_config
from tasks.cli import main

BENCH = Path(__file__).parents[2] / "benchmarks" / "removal.yaml"


def test_quick_perf_run_writes_every_section_with_the_same_bytes_as_diffusers(tmp_path):
    assert main(["bench", "perf", "--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    report = json.loads((tmp_path / "perf.json").read_text())
    assert report["quick"] and report["commit"] and report["command"].startswith("hfi bench perf")
    assert 0 < report["uce"]["seconds"] < 10 and report["uce"]["layers"] > 0
    gen = report["generation"]
    assert gen["same_bytes"] is True, "sampling.sample must draw diffusers' own bytes for the same seeds"
    assert all(v > 0 for v in gen["images_per_s"].values())
    sdd = report["sdd"]
    assert sdd["settings"]["reference"] == {"steps": sdd["settings"]["default"]["steps"] * sdd["settings"]["default"]["batch_size"],
                                            "batch_size": 1, "rollout_reuse": 1, "lr": sdd["settings"]["default"]["lr"],
                                            "sampler_steps": sdd["settings"]["default"]["sampler_steps"], "anchor": False}  # fmt: skip
    assert sdd["per_state_speedup"] > 0 and "speedup" not in sdd  # quick: no removal is judged
    md = (tmp_path / "perf.md").read_text()
    assert "closed-form edit" in md and "same bytes" in md and report["commit"] in md


def test_worse_by_reads_target_and_preserve_groups_each_their_own_way():
    ref = {"target:explicit": 0.20, "preserve:dotted": 0.90}
    assert worse_by({"target:explicit": 0.25, "preserve:dotted": 0.95}, ref) == {"target:explicit": 0.05,
                                                                                 "preserve:dotted": -0.05}  # fmt: skip


def test_full_sdd_comparison_judges_checkpoints_in_order_and_counts_a_speedup_only_at_equal_removal(tmp_path):
    bench, cfg = load_bench_config(BENCH)
    sdd = bench.sdd.model_copy(update={"steps": 8, "rollout_reuse": 2})
    bench = bench.model_copy(update={"sdd": sdd, "tuned": {},
                                     "tuning": bench.tuning.model_copy(update={"n_per_group": 3})})  # fmt: skip
    assert sdd_configs(cfg, bench)["reference"].steps == 8 * sdd.batch_size
    scaled = sdd_configs(cfg, bench, lr=4 * sdd.lr)  # the default's lr alone moves
    assert (scaled["default"].lr, scaled["reference"].lr) == (4 * sdd.lr, sdd.lr)
    r = bench_sdd(cfg, bench, tmp_path, probe_steps=1, full=True, checkpoints=2, show_progress=False)
    cps = r["default"]["checkpoints"]
    assert [c["step"] for c in cps] == [4, 8][: len(cps)] and cps
    assert all(c["seconds"] <= r["default"]["train_seconds"] + 1e-6 for c in cps)
    # judged in order until the first at equal removal, and the speedup is the time to that one
    assert [c["equal_removal"] for c in cps[:-1]] == [False] * (len(cps) - 1)
    assert r["equal_removal"] == cps[-1]["equal_removal"] == (max(cps[-1]["worse_by"].values()) <= EQUAL_REMOVAL)
    if r["equal_removal"]:
        assert r["speedup"] == pytest.approx(r["reference"]["train_seconds"] / cps[-1]["seconds"], rel=0.05)
    else:
        assert "speedup" not in r and len(cps) == 2
    assert set(r["reference"]["groups"]) == set(cps[0]["groups"]) and any(g.startswith("preserve") for g in cps[0]["groups"])
