from pathlib import Path

import pytest
import yaml

from hfi_core.config import ConfigError, RunConfig, from_dict, load_config
from hfi_core.toyworld import default_world

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_the_three_use_cases():
    assert {p.name for p in CONFIGS} >= {"toyworld-striped.yaml", "sd14-nudity.yaml", "sd14-van-gogh.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_has_a_target_group(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert any(p.group.startswith("target") for p in cfg.prompts)


def test_toyworld_paths_resolve_to_the_committed_world():
    cfg = load_config(next(p for p in CONFIGS if p.name == "toyworld-striped.yaml"))
    assert cfg.model.path == str(default_world() / "sd")
    assert cfg.reward.clip == str(default_world() / "clip")
    assert sum(len(p.prompts) * p.images_per_prompt for p in cfg.prompts) == 540


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
        ({"generation": {"stepz": 3}}, r"generation: unknown key\(s\) \['stepz'\]"),
        ({"generation": {"scheduler": "heun"}}, r"generation\.scheduler: expected one of \['dpmsolver'"),
        ({"feedback": {"simulate": {"noise": "lots"}}}, r"feedback\.simulate\.noise: expected float"),
        ({"model": {}}, r"model\.path: required"),
        ({"prompts": [{"group": "preserve", "prompts": ["p"]}]}, r"at least one group starting with 'target'"),
        ({"prompts": [{"group": "target", "prompts": []}]}, r"group 'target': prompts is empty"),
        ({"prompts": [{"group": "bogus", "prompts": ["p"]}]}, r"group 'bogus': must start with"),
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


def test_ints_are_accepted_where_floats_are_expected_but_bools_are_not_ints():
    cfg = from_dict(RunConfig, {**BASE, "generation": {"guidance": 7}})
    assert cfg.generation.guidance == 7.0 and isinstance(cfg.generation.guidance, float)
    with pytest.raises(ConfigError, match="generation.steps: expected int, got True"):
        from_dict(RunConfig, {**BASE, "generation": {"steps": True}})


def test_overridable_fields_carry_types_defaults_and_the_field_docstrings():
    from hfi_core.config import overridable_fields

    fields = {k: (d, t, doc) for k, d, t, doc in overridable_fields()}
    assert fields["distill.lr"] == (1e-5, "number", "AdamW learning rate (constant).")
    assert fields["distill.method"][1] == "string" and fields["distill.steps"][:2] == (1500, "integer")
    assert fields["promotion.max_concept_rate"][0] == 0.1 and "distill.concept_prompts" not in fields


def test_overrides_apply_before_validation_and_bad_ones_name_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(path, {"distill.lr": 3e-4, "distill.method": "esd"})
    assert cfg.distill.lr == 3e-4 and cfg.distill.method == "esd"
    with pytest.raises(ConfigError, match=r"distill\.method: expected one of \['sdd', 'esd'\], got 'xyz'"):
        load_config(path, {"distill.method": "xyz"})
