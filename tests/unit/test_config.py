import json
from pathlib import Path

import pytest
import yaml

from hfi_core.config import ConfigError, RunConfig, config_hash, load_config, parse
from hfi_core.models import locate
from hfi_core.toyworld import default_world

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_the_three_use_cases():
    assert {p.name for p in CONFIGS} >= {"toyworld-striped.yaml", "sd14-nudity.yaml", "sd14-van-gogh.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_has_a_target_group(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert any(p.group.startswith("target") for p in cfg.prompts)


def test_toyworld_references_stay_symbolic_and_locate_resolves_them_to_the_committed_world():
    cfg = load_config(next(p for p in CONFIGS if p.name == "toyworld-striped.yaml"))
    assert cfg.model.path == "toyworld:sd" and cfg.reward.clip == "toyworld:clip"
    assert locate(cfg.model.path) == str(default_world() / "sd")
    assert locate(cfg.reward.clip) == str(default_world() / "clip")
    assert locate("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    assert sum(len(p.prompts) * p.images_per_prompt for p in cfg.prompts) == 432  # 6 groups x 6 prompts x 12


def _write(tmp_path, data):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


BASE = {
    "name": "x",
    "concept": {"name": "c"},
    "model": {"path": "m"},
    "prompts": [{"group": "target", "prompts": ["p"]}],
}


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"generation": {"steps": "ten"}}, r"generation\.steps: expected int, got 'ten'"),
        ({"generation": {"stepz": 3}}, r"generation: unknown key\(s\) \['stepz'\]; known: \['batch_size'"),
        ({"generation": {"steps": 0}}, r"generation\.steps: must be >= 1, got 0"),
        ({"distill": {"lr": -1e-5}}, r"distill\.lr: must be > 0\.0, got -1e-05"),
        ({"feedback": {"simulate": {"noise": 1.5}}}, r"feedback\.simulate\.noise: must be <= 1\.0, got 1\.5"),
        ({"evaluate": {"baselines": ["sld-huge"]}}, r"evaluate\.baselines\[0\]: expected one of \['negative_prompt'"),
        ({"model": {"path": "toyworld:unet"}}, r"model\.path: 'toyworld:unet': the toy world has sd, clip, oracle"),
        ({"generation": {"steps": "10"}}, r"generation\.steps: expected int, got '10'"),
        ({"generation": {"scheduler": "heun"}}, r"generation\.scheduler: expected one of \['dpmsolver'"),
        ({"feedback": {"simulate": {"noise": "lots"}}}, r"feedback\.simulate\.noise: expected float"),
        ({"model": {}}, r"model\.path: required"),
        ({"prompts": [{"group": "preserve", "prompts": ["p"]}]}, r"at least one group starting with 'target'"),
        ({"prompts": [{"group": "target", "prompts": []}]}, r"group 'target': prompts is empty"),
        ({"prompts": [{"group": "bogus", "prompts": ["p"]}]}, r"prompts\[0\]: group 'bogus': must start with"),
    ],
)
def test_a_bad_value_is_refused_with_the_file_and_the_key(tmp_path, patch, message):
    path = _write(tmp_path, {**BASE, **patch})
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_a_file_that_is_not_yaml_is_refused_by_name(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: cannot read YAML"):
        load_config(p)


def _laughs(levels: int) -> str:
    """The billion-laughs file: each level lists the one before nine times (9**levels strings)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", [_laughs(9), _laughs(6), "&a [*a, *a]", "[" * 20000 + "]" * 20000],
                         ids=["billion-laughs", "six-levels", "self-reference", "deep-nesting"])  # fmt: skip
def test_alias_bombs_and_deep_nesting_are_refused_at_once_by_name(tmp_path, text):
    import time

    p = tmp_path / "bomb.yaml"
    p.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^\S*bomb.yaml: cannot read YAML: (expands to more|nested more than)"):
        load_config(p)
    assert time.perf_counter() - t0 < 1.0


def test_anchors_and_aliases_of_ordinary_size_still_work(tmp_path):
    base = yaml.safe_load(CONFIGS[-1].read_text())
    text = CONFIGS[-1].read_text().replace("generation:", "generation: &gen", 1) + "\n_copy: *gen\n"
    p = tmp_path / "anchors.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="_copy"):  # read fine; the unknown key is what is refused
        load_config(p)
    assert base["generation"]


def test_ints_are_accepted_where_floats_are_expected_but_bools_are_not_ints():
    cfg = parse(RunConfig, {**BASE, "generation": {"guidance": 7}})
    assert cfg.generation.guidance == 7.0 and isinstance(cfg.generation.guidance, float)
    with pytest.raises(ConfigError, match="generation.steps: expected int, got True"):
        parse(RunConfig, {**BASE, "generation": {"steps": True}})


def test_derived_defaults_are_resolved_once_at_load():
    cfg = parse(RunConfig, BASE)
    assert cfg.concept.init_word == cfg.invert.init_word == "c"
    assert cfg.concept.clip_texts == ["c"] and cfg.concept.neutral_texts == ["a picture"]
    assert cfg.concept.sld_text == "c" and cfg.evaluate.negative_prompt == "c"
    assert cfg.evaluate.clip == cfg.reward.clip and cfg.promotion.model_name == "hfi-c"
    set_ = parse(RunConfig, {**BASE, "concept": {"name": "c", "init_word": "w", "clip_texts": ["x", "y"]},
                             "reward": {"clip": "my/clip"}, "promotion": {"model_name": "m"}})  # fmt: skip
    assert set_.invert.init_word == "w" and set_.concept.sld_text == "x, y"
    assert set_.evaluate.clip == "my/clip" and set_.promotion.model_name == "m"
    assert parse(RunConfig, BASE).evaluate.clip == "openai/clip-vit-large-patch14"  # no default shared between runs


def test_overridable_fields_carry_schemas_defaults_and_the_field_docstrings():
    from hfi_core.config import overridable_fields

    fields = {f["key"]: f for f in overridable_fields()}
    lr = fields["distill.lr"]
    assert lr["default"] == 1e-5 and lr["doc"] == "AdamW learning rate (constant)."
    assert lr["schema"] == {"type": "number", "exclusiveMinimum": 0.0}
    assert fields["distill.method"]["schema"] == {"type": "string", "enum": ["sdd", "esd", "uce"]}
    assert fields["distill.steps"]["schema"] == {"type": "integer", "minimum": 1}
    assert fields["promotion.max_concept_rate"]["schema"] == {"type": "number", "minimum": 0.0, "maximum": 1.0}
    assert "distill.concept_prompts" not in fields


def test_overrides_apply_before_validation_and_bad_ones_name_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(path, {"distill.lr": 3e-4, "distill.method": "esd"})
    assert cfg.distill.lr == 3e-4 and cfg.distill.method == "esd"
    with pytest.raises(ConfigError, match=r"distill\.method: expected one of \['sdd', 'esd', 'uce'\], got 'xyz'"):
        load_config(path, {"distill.method": "xyz"})


def test_small_floats_written_without_a_dot_are_floats_in_files_and_in_set(tmp_path):
    from tasks.common import parse_overrides

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE) + "distill:\n  lr: 1e-5\n  weight_decay: 2e-05\n")
    cfg = load_config(path)
    assert cfg.distill.lr == 1e-05 and cfg.distill.weight_decay == 2e-05
    assert parse_overrides(["distill.lr=2e-05", "distill.method=esd", "invert.steps=10"]) == {
        "distill.lr": 2e-05, "distill.method": "esd", "invert.steps": 10}  # fmt: skip


def test_config_hash_of_every_shipped_config_is_the_same_from_another_checkout_folder(tmp_path):
    """The hash names the settings, not where the project sits: the library copied to another
    folder (another checkout, another machine) hashes every shipped config, copied too, the same."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).parents[2]
    other = tmp_path / "elsewhere" / "checkout"
    shutil.copytree(root / "hfi_core", other / "hfi_core", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copytree(root / "configs", other / "configs")
    code = ("import json, hfi_core; from pathlib import Path; from hfi_core.config import config_hash, load_config;"
            "print(hfi_core.__file__);"
            "print(json.dumps({p.name: config_hash(load_config(p)) for p in sorted(Path('configs').glob('*.yaml'))}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=other, capture_output=True, text=True,
                         env={"PYTHONPATH": str(other)})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    library, hashes = out.stdout.splitlines()[-2:]
    assert library == str(other / "hfi_core" / "__init__.py")  # the copy, not this checkout
    theirs = json.loads(hashes)
    assert theirs == {p.name: config_hash(load_config(p)) for p in CONFIGS}
    assert config_hash(load_config(CONFIGS[0], {"distill.lr": 0.123})) != theirs[CONFIGS[0].name]


def test_relative_model_folders_and_exports_resolve_against_the_config_file(tmp_path):
    data = {**BASE, "model": {"path": "./sd"}, "reward": {"clip": "../clip"}, "evaluate": {"oracle": "./oracle"},
            "feedback": {"files": ["exports/a.json"], "simulate": {"oracle": "./oracle"}}}  # fmt: skip
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    assert cfg.model.path == str(tmp_path / "cfg" / "sd") and cfg.reward.clip == str(tmp_path / "clip")
    assert cfg.evaluate.clip == cfg.reward.clip  # the derived default follows the resolved value
    assert cfg.evaluate.oracle == cfg.feedback.simulate.oracle == str(tmp_path / "cfg" / "oracle")
    assert cfg.feedback.files == [str(tmp_path / "cfg" / "exports" / "a.json")]
    assert load_config(_write(tmp_path, {**BASE, "model": {"path": "CompVis/stable-diffusion-v1-4"}})).model.path == (
        "CompVis/stable-diffusion-v1-4"
    )  # a hub id is not a folder
