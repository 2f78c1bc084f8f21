"""`hfi bench removal`'s settings and its report, without training anything."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.removal import METHODS, load_bench_config, method_config, per_prompt, quick_config, results_table
from hfi_core.config import ConfigError
from hfi_core.evaluation import eval_plan

BENCH = Path(__file__).parents[2] / "benchmarks" / "removal.yaml"


def test_the_committed_benchmark_config_loads_with_its_run_config():
    bench, cfg = load_bench_config(BENCH)
    assert bench.eval_seed != bench.validation_seed
    assert cfg.evaluate.oracle  # judged by the toy world's oracle
    assert per_prompt(cfg, bench.n_per_group) * min(len(ps.prompts) for ps in cfg.prompts) >= 128
    assert per_prompt(cfg, bench.quick.n_per_group) * min(len(ps.prompts) for ps in cfg.prompts) >= 32


def test_every_evaluation_image_has_its_own_seed_and_the_validation_and_evaluation_sets_never_meet():
    bench, cfg = load_bench_config(BENCH)
    n = per_prompt(cfg, bench.n_per_group)
    evaluation, validation = eval_plan(cfg, n, bench.eval_seed), eval_plan(cfg, n, bench.validation_seed)
    seeds = [s for _, _, s in evaluation]
    assert len(set(seeds)) == len(seeds) == n * sum(len(ps.prompts) for ps in cfg.prompts)
    assert not set(seeds) & {s for _, _, s in validation}
    # plan order: group by group, prompt by prompt, n images each (group_slices relies on it)
    assert [p for _, p, _ in evaluation[:n]] == [cfg.prompts[0].prompts[0]] * n
    assert eval_plan(cfg, n, bench.eval_seed) == evaluation  # the same pairs for every method


def test_methods_of_one_family_share_every_hyperparameter_but_the_token():
    bench, cfg = load_bench_config(BENCH)
    by_name = {m.name: m for m in METHODS}
    for text, hfi in (("sdd", "hfi+sdd"), ("esd-x", "hfi+esd-x")):
        a = method_config(cfg, bench, by_name[text], quick=False).distill
        b = method_config(cfg, bench, by_name[hfi], quick=False).distill
        assert a.use_token is False and b.use_token is True
        assert {**a.model_dump(), "use_token": None} == {**b.model_dump(), "use_token": None}
    assert method_config(cfg, bench, by_name["sdd"], quick=False).distill.method == "sdd"
    assert method_config(cfg, bench, by_name["esd-x"], quick=False).distill.method == "esd"
    assert method_config(cfg, bench, by_name["sdd"], quick=True).distill.steps == bench.quick.distill_steps
    assert {ps.images_per_prompt for ps in quick_config(cfg, bench).prompts} == {bench.quick.images_per_prompt}


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"eval_seed": 2000000}, "eval_seed: must differ from validation_seed"),
        ({"sdd": {"method": "esd"}}, "the families are 'sdd' and 'esd'"),
        ({"esd": {"lr": "fast"}}, "esd.lr"),
        ({"n_per_groups": 3}, "unknown key"),
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


def test_the_results_table_has_one_row_per_method_and_every_column():
    rng = np.random.default_rng(0)
    row = {k: float(rng.random()) for k in ("striped[explicit]", "striped[implicit:zebra]", "striped[implicit:barcode]",
                                            "dotted[dotted]", "plain[plain]", "shape_acc", "color_acc",
                                            "drift_non_target", "clip_concept_rate_target")}  # fmt: skip
    results = {
        "mode": "full",
        "seconds": 12.0,
        "settings": {"eval_seed": 3, "validation_seed": 2, "images_per_group": {"a": 135, "b": 135}},
        "methods": {m.name: {**row, "train_seconds": 5.0, "peak_memory_mb": None} for m in METHODS},
    }
    md = results_table(results).splitlines()
    header = next(line for line in md if line.startswith("| method"))
    assert header.count("|") == 13
    rows = [line for line in md if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == [m.name for m in METHODS]
    assert f"{row['striped[explicit]']:.3f}" in rows[0]


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
