"""`hfi bench removal`'s settings and its report, without training anything."""

from pathlib import Path

import pytest
import yaml
from PIL import Image

from benchmarks.removal import (
    METHODS,
    cell,
    claims,
    eval_config,
    load_bench_config,
    method_config,
    per_prompt,
    quick_config,
    replicate_config,
    results_table,
    save_group_plot,
    upstream_config,
)
from hfi_core.config import ConfigError
from hfi_core.evaluation import eval_plan
from hfi_core.metrics import wilson_interval

BENCH = Path(__file__).parents[2] / "benchmarks" / "removal.yaml"


def test_the_committed_benchmark_config_loads_with_its_run_config():
    bench, cfg = load_bench_config(BENCH)
    assert bench.eval_seed != bench.validation_seed and len(bench.seeds) >= 3
    assert cfg.evaluate.oracle  # judged by the toy world's oracle
    assert per_prompt(bench.evaluation_prompts, bench.n_per_group) * 3 >= bench.n_per_group


def test_evaluation_prompts_are_held_out_from_feedback_token_anchors_and_tuning():
    bench, cfg = load_bench_config(BENCH)
    evaluated = {p for ps in bench.evaluation_prompts for p in ps.prompts}
    upstream = {p for ps in cfg.prompts for p in ps.prompts}
    anchors = {p for fam in (bench.sdd, bench.esd, bench.uce) for p in fam.preserve_prompts}
    assert evaluated and not evaluated & upstream and not evaluated & anchors
    # every evaluated group is also an upstream group, on other colour x shape pairs
    assert [ps.group for ps in bench.evaluation_prompts] == [ps.group for ps in cfg.prompts]


def test_an_evaluation_prompt_that_feedback_saw_is_refused_naming_the_group(tmp_path):
    data = yaml.safe_load(BENCH.read_text())
    data["config"] = str(BENCH.parent / data["config"])
    data["evaluation_prompts"][0]["prompts"].append("a red circle in the style of van stripe")
    bad = tmp_path / "bench.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"evaluation_prompts\[0\] \(target:explicit\).*must be held out"):
        load_bench_config(bad)


def test_every_replicate_reseeds_the_whole_chain_and_evaluates_on_its_own_seeds():
    bench, cfg = load_bench_config(BENCH)
    a, b = replicate_config(cfg, 0), replicate_config(cfg, 1)
    for get in (lambda c: c.generation.seed, lambda c: c.feedback.simulate.seed, lambda c: c.reward.seed,
                lambda c: c.invert.seed):  # fmt: skip
        assert get(a) == 0 and get(b) == 1
    m = next(m for m in METHODS if m.name == "hfi+sdd")
    assert method_config(b, bench, m, quick=False, seed=1).distill.seed == 1
    n = per_prompt(bench.evaluation_prompts, bench.n_per_group)
    plans = [eval_plan(eval_config(cfg, bench.evaluation_prompts, n, bench.eval_seed + 100_000 * i), n,
                       bench.eval_seed + 100_000 * i) for i in range(len(bench.seeds))]  # fmt: skip
    seeds = [s for plan in plans for _, _, s in plan]
    assert len(set(seeds)) == len(seeds)  # no image seed twice, across replicates too
    validation = eval_plan(eval_config(cfg, cfg.prompts, n, bench.validation_seed), n, bench.validation_seed)
    assert not set(seeds) & {s for _, _, s in validation}


def test_methods_of_one_family_share_every_hyperparameter_but_the_token():
    bench, cfg = load_bench_config(BENCH)
    by_name = {m.name: m for m in METHODS}
    pairs = (("sdd", "hfi+sdd"), ("esd-x", "hfi+esd-x"), ("uce", "hfi+uce"), ("sdd", "hfi+sdd (ranking)"),
             ("uce", "hfi+uce (one token)"))  # fmt: skip
    for text, hfi in pairs:  # one family, one starting point; tuning may then move each its own way
        a = method_config(cfg, bench, by_name[text], quick=False, tuned=False).distill
        b = method_config(cfg, bench, by_name[hfi], quick=False, tuned=False).distill
        assert a.use_token is False and b.use_token is True
        assert {**a.model_dump(), "use_token": None} == {**b.model_dump(), "use_token": None}
    assert method_config(cfg, bench, by_name["uce"], quick=False).distill.method == "uce"
    assert method_config(cfg, bench, by_name["hfi+sdd (ranking)"], quick=False).feedback.kind == "ranking"
    assert method_config(cfg, bench, by_name["hfi+sdd"], quick=False).feedback.kind == "binary"
    assert upstream_config(cfg, bench, "ranking").generation == cfg.generation  # the same images, ranked
    one = method_config(cfg, bench, by_name["hfi+uce (one token)"], quick=False)  # the paper's inversion
    assert (one.invert.vectors, one.invert.modes, one.feedback.kind) == (1, 1, "binary")
    assert one.invert.model_dump(exclude={"vectors", "modes"}) == cfg.invert.model_dump(exclude={"vectors", "modes"})
    assert method_config(cfg, bench, by_name["sdd"], quick=True).distill.steps == bench.quick.distill_steps
    assert {ps.images_per_prompt for ps in quick_config(cfg, bench).prompts} == {bench.quick.images_per_prompt}


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"eval_seed": 2000000}, "eval_seed: must differ from validation_seed"),
        ({"sdd": {"method": "esd"}}, "the families are 'sdd', 'esd' and 'uce'"),
        ({"esd": {"lr": "fast"}}, "esd.lr"),
        ({"n_per_groups": 3}, "unknown key"),
        ({"seeds": [1, 1, 2]}, "repeats a seed"),
        ({"ranking": {"feedback": {"kind": "stars"}}}, "ranking: .*feedback.kind"),
    ],
)
def test_a_bad_benchmark_config_is_refused_naming_file_and_key(tmp_path, patch, message):
    data = yaml.safe_load(BENCH.read_text())
    for k, v in patch.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) else v
    data["config"] = str(BENCH.parent / data["config"])
    bad = tmp_path / "bench.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message) as e:
        load_bench_config(bad)
    assert str(bad) in str(e.value)


def test_wilson_intervals_match_known_values_and_stay_inside_zero_one():
    lo, hi = wilson_interval(0, 100)
    assert lo == 0.0 and hi == pytest.approx(0.0370, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert wilson_interval(100, 100)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)
    for n in range(1, 300):  # the ends hold the share exactly, whatever rounding does
        assert wilson_interval(n, n)[1] == 1.0 and wilson_interval(0, n)[0] == 0.0
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_a_cell_pools_images_for_its_interval_and_keeps_each_seed():
    c = cell([(9, 90), (3, 90), (0, 90)])
    assert c["mean"] == pytest.approx(12 / 270) and (c["min"], c["max"]) == (0.0, 0.1)
    assert (c["lo"], c["hi"]) == wilson_interval(12, 270) and c["per_seed"] == [0.1, 3 / 90, 0.0]


def _results(hfi_share=0.05, text_share=0.8):
    groups = ["striped[explicit]", "striped[implicit:barcode]", "striped[implicit:zebra]", "striped[context:circus]"]
    rows = {}
    for m in METHODS:
        share = 1.0 if not m.family else hfi_share if m.token else text_share
        row = {g: cell([(int(share * 90), 90)] * 3) for g in groups}
        row |= {k: cell([(90, 90)] * 3) for k in ("dotted[dotted]", "plain[plain]", "shape_acc", "color_acc")}
        row |= {
            k: cell([(0, 90)] * 3) for k in ("became_dotted", "became_plain", "striped_in[dotted]", "striped_in[plain]")
        }
        rows[m.name] = row | {"drift_non_target": 0.01, "train_seconds": 5.0, "peak_memory_mb": None}
    results = {"mode": "full", "seeds": [0, 1, 2], "seconds": 12.0, "methods": rows,
               "settings": {"eval_seeds": [3, 4, 5], "validation_seed": 2, "images_per_group": {"a": 90}}}  # fmt: skip
    results["claims"] = claims(results)
    return results


def test_the_claims_say_whether_hfi_wins_and_whether_the_intervals_separate():
    won = {c["claim"]: c for c in _results()["claims"]}
    assert won["hfi+sdd removes more of the concept than sdd"]["holds"]
    assert all(v["separate"] for v in won["hfi+sdd removes more of the concept than sdd"]["groups"].values())
    assert won["text-only sdd on the name leaves at least 0.5 of the concept on some implicit group"]["holds"]
    lost = {c["claim"]: c for c in _results(hfi_share=0.3, text_share=0.3)["claims"]}
    assert not lost["hfi+sdd removes more of the concept than sdd"]["holds"]
    assert not lost["hfi+sdd leaves at most 0.10 on the explicit and every implicit group, in every seed"]["holds"]


def test_the_results_table_has_one_row_per_method_with_intervals_and_the_claims(tmp_path):
    results = _results()
    md = results_table(results)
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == [m.name for m in METHODS]
    lo, hi = wilson_interval(12, 270)  # 4 of 90 images in each of 3 seeds
    hfi_row = rows[[m.name for m in METHODS].index("hfi+sdd")]
    assert f"0.044 [0.04-0.04] ({lo:.2f}-{hi:.2f})" in hfi_row
    assert "## Claims" in md and "does NOT hold" not in md.split("## Claims")[1].split("hfi+sdd (ranking)")[0]
    save_group_plot(tmp_path / "groups.png", results)
    assert Image.open(tmp_path / "groups.png").width > 800


def test_resume_reuses_a_training_step_only_when_its_settings_and_token_match(tmp_path):
    """The bench's trainings are pipeline steps: the one resume rule is the marker's input hashes."""
    from hfi_core.steps import step_inputs
    from hfi_core.store import LocalStore

    bench, cfg = load_bench_config(BENCH)
    mcfg = method_config(cfg, bench, next(m for m in METHODS if m.name == "hfi+sdd"), quick=False)
    store = LocalStore(str(tmp_path))
    with pytest.raises(RuntimeError, match="upstream stage 'invert' has not finished"):
        step_inputs("distill", mcfg, store, "m")
    store.mark_success("m/invert", {}, {"learned_embeds.safetensors": "a" * 64})
    inputs = step_inputs("distill", mcfg, store, "m")
    assert step_inputs("distill", mcfg.model_copy(), store, "m") == inputs  # same settings: reused
    longer = mcfg.model_copy(update={"distill": mcfg.distill.model_copy(update={"steps": mcfg.distill.steps + 1})})
    assert step_inputs("distill", longer, store, "m")["config"] != inputs["config"]  # a changed setting trains again
    store.mark_success("m/invert", {}, {"learned_embeds.safetensors": "b" * 64})
    assert step_inputs("distill", mcfg, store, "m")["invert"] != inputs["invert"]  # another token trains again


def test_tuning_gives_every_method_the_same_budget_and_picks_by_the_stated_rule(tmp_path):
    from benchmarks.tune import candidate_config, scores, select

    bench, cfg = load_bench_config(BENCH)
    sizes = {f: len(c) for f, c in bench.tuning.candidates.items()}
    assert set(sizes) == {"sdd", "esd", "uce"} and len(set(sizes.values())) == 1
    assert bench.tuning.seed not in bench.seeds
    m = next(m for m in METHODS if m.name == "uce")
    c = candidate_config(cfg, bench, m, {"uce_lambda": 1.0})
    assert c.distill.uce_lambda == 1.0 and c.distill.seed == bench.tuning.seed and c.distill.use_token is False
    # the rule: lowest worst share among those that keep the rest; else the smallest drop
    rows = [{"worst": 0.02, "drop": 0.20}, {"worst": 0.10, "drop": 0.01}, {"worst": 0.05, "drop": 0.04}]
    assert select(rows, 0.05) == 2 and select(rows[:1], 0.05) == 0 and select(rows, 0.001) == 1
    sd = {"target:x": {"oracle_striped": 1.0, "oracle_shape_acc": 1.0, "oracle_color_acc": 1.0},
          "preserve:dotted": {"oracle_dotted": 1.0, "oracle_striped": 0.0, "oracle_shape_acc": 1.0,
                              "oracle_color_acc": 1.0}}  # fmt: skip
    after = {"target:x": {"oracle_striped": 0.2, "oracle_shape_acc": 1.0, "oracle_color_acc": 0.9},
             "preserve:dotted": {"oracle_dotted": 0.7, "oracle_striped": 0.0, "oracle_shape_acc": 1.0,
                                 "oracle_color_acc": 1.0}}  # fmt: skip
    assert scores(after, sd) == pytest.approx({"worst": 0.2, "drop": 0.3})


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"tuning": {"candidates": {"sdd": [{"lr": 1e-3}], "esd": []}}}, "the same number"),
        ({"tuning": {"candidates": {"sdd": [{"lr_typo": 1e-3}]}}}, "not distill settings"),
        ({"tuning": {"seed": 1}}, "tuning.seed: 1 is an evaluation replicate"),
        ({"tuned": {"sld-max": {"lr": 1e-3}}}, "tuned.sld-max: not a trained method"),
    ],
)
def test_a_tuning_section_that_would_favour_a_method_is_refused(tmp_path, patch, message):
    data = yaml.safe_load(BENCH.read_text())
    data.update(patch)
    data["config"] = str(BENCH.parent / data["config"])
    bad = tmp_path / "bench.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_bench_config(bad)


def test_a_methods_tuned_overrides_apply_to_it_alone():
    bench, cfg = load_bench_config(BENCH)
    bench = bench.model_copy(update={"tuned": {"hfi+sdd": {"lr": 0.0016}}})
    by_name = {m.name: m for m in METHODS}
    assert method_config(cfg, bench, by_name["hfi+sdd"], quick=False).distill.lr == 0.0016
    assert method_config(cfg, bench, by_name["sdd"], quick=False).distill.lr == bench.sdd.lr


def test_each_upstream_variant_redoes_only_its_own_stages_on_the_replicates_others(tmp_path):
    from benchmarks.removal import REDONE, UPSTREAM, upstream_dir, variant_tasks

    bench, cfg = load_bench_config(BENCH)
    rdir = tmp_path / "seed-0"
    tasks = {t.key[0]: t for t in variant_tasks(cfg, bench, rdir, (0,), 1)}
    assert set(tasks) == {"ranking", "one token"} and REDONE["one token"] == ("invert",)
    for variant, task in tasks.items():
        run = upstream_dir(rdir, variant)
        assert task.needs == (("upstream", 0),) and task.args[1] == run and task.args[2] == REDONE[variant]
        linked = sorted(p.name for p in run.iterdir())
        assert linked == sorted(s for s in UPSTREAM if s not in REDONE[variant])
        assert all((run / s).resolve() == (rdir / "run" / s).resolve() for s in linked)
    assert tasks["one token"].args[0].invert.modes == 1 and tasks["ranking"].args[0].feedback.kind == "ranking"


def test_linking_again_before_the_upstream_has_run_keeps_the_links(tmp_path):
    from benchmarks.removal import link_stages

    run = link_stages(tmp_path / "m", tmp_path / "up", ("generate", "invert"))  # targets do not exist yet
    link_stages(tmp_path / "m", tmp_path / "up", ("generate", "invert"))  # a resumed tune or bench
    (tmp_path / "up" / "invert").mkdir(parents=True)
    assert (run / "invert").is_dir() and (run / "generate").is_symlink()
