"""`hfi bench seeds`: the replicates it runs and the report it writes, without training anything."""

from pathlib import Path

import pytest

from benchmarks.seeds import seed_config, seed_row, seeds_table
from hfi_core.config import load_config
from tasks.cli import main

CONFIG = Path(__file__).parents[2] / "configs" / "toyworld-striped.yaml"


def test_every_replicate_reseeds_every_stage_and_evaluates_on_seeds_of_its_own():
    cfg = load_config(CONFIG)
    a, b = seed_config(cfg, 0, 0), seed_config(cfg, 7, 1)
    seeds = (lambda c: c.generation.seed, lambda c: c.feedback.simulate.seed, lambda c: c.reward.seed,
             lambda c: c.invert.seed, lambda c: c.distill.seed)  # fmt: skip
    assert [get(a) for get in seeds] == [0] * 5 and [get(b) for get in seeds] == [7] * 5
    plan_a = range(a.evaluate.seed, a.evaluate.seed + 10_000)
    assert b.evaluate.seed not in plan_a and a.evaluate.seed == cfg.evaluate.seed
    # nothing else changes: the replicate is the shipped config
    strip = {"generation", "feedback", "reward", "invert", "distill", "evaluate"}
    assert a.model_dump(exclude=strip) == cfg.model_dump(exclude=strip)
    assert a.distill.model_dump(exclude={"seed"}) == cfg.distill.model_dump(exclude={"seed"})


def _result(rate: float, drop: float) -> dict:
    gates = {"concept_rate": {"value": rate, "limit": 0.1, "passed": rate <= 0.1},
             "preservation_drop": {"value": drop, "limit": 0.05, "passed": drop <= 0.05}}  # fmt: skip
    return {"register": {"gates_passed": rate <= 0.1 and drop <= 0.05, "gates": gates},
            "generate_seconds": 10.0, "distill_seconds": 20.0}  # fmt: skip


def test_the_report_names_each_failed_gate_and_counts_the_seeds_that_passed():
    summary = {v: {"target:explicit": {"oracle_striped": s}, "preserve:dotted": {"oracle_striped": 0.0}}
               for v, s in (("sd", 1.0), ("distilled", 0.05))}  # fmt: skip
    rows = [seed_row(0, _result(0.05, 0.01), summary, "oracle_striped"),
            seed_row(1, _result(0.30, 0.01), summary, "oracle_striped")]  # fmt: skip
    assert rows[0]["passed"] and not rows[1]["passed"]
    assert rows[0]["groups"]["target:explicit"] == {"before": 1.0, "after": 0.05}
    assert rows[0]["seconds"] == {"generate": 10.0, "distill": 20.0}
    md = seeds_table({"config": "toy", "method": {"method": "esd"}, "metric": "oracle_striped", "seeds": rows,
                      "seconds": 5, "provenance": {"commit": "abc"}})  # fmt: skip
    assert "Gates passed on **1 of 2** seeds" in md
    line = next(x for x in md.splitlines() if x.startswith("| 1 |"))
    assert "**failed**" in line and "0.300 (0.1) **x**" in line and "0.010 (0.05) **x**" not in line
    assert "1.00 -> 0.05" in md and "Commit: `abc`" in md


def test_the_command_refuses_a_repeated_seed_in_one_line(tmp_path, capsys):
    assert main(["bench", "seeds", "--out", str(tmp_path), "--seeds", "1", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hfi: error: --seeds: [1, 1] repeats a seed") and "\n" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("seeds", [["0"], ["0", "1", "2"]])
def test_the_command_parses_its_seeds(seeds):
    from tasks.cli import build_parser

    args = build_parser().parse_args(["bench", "seeds", "--out", "x", "--seeds", *seeds])
    assert args.seeds == [int(s) for s in seeds] and args.config.name == "toyworld-striped.yaml"
