"""Generation on the committed toy world: reproducible bytes, stable seeds, resumable."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from hfi_core.config import load_config
from hfi_core.generation import generate
from hfi_core.images import MANIFEST_COLUMNS, read_manifest
from hfi_core.steps import run_local_step
from tasks.cli import main as hfi


def _config(tmp_path, world, prompts, name="run.yaml", **generation):
    data = {
        "name": "t",
        "concept": {"name": "striped"},
        "model": {"path": str(world / "sd")},
        "prompts": [{"group": "target:explicit", "prompts": prompts, "images_per_prompt": 3}],
        "generation": {"steps": 8, "batch_size": 4, **generation},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


P = ["a red circle in the style of van stripe", "a blue square with a zebra pattern"]


def _images(folder, manifest):
    return {r.image_id: (folder / r.uri).read_bytes() for r in manifest.itertuples()}


def test_the_same_config_gives_the_same_bytes_and_the_documented_manifest(world, tmp_path):
    cfg = load_config(_config(tmp_path, world, P))
    a = read_manifest(generate(cfg, tmp_path / "a", show_progress=False).manifest)
    b = read_manifest(generate(cfg, tmp_path / "b", show_progress=False).manifest)
    assert list(a.columns) == MANIFEST_COLUMNS and len(a) == 6
    assert a.equals(b) and _images(tmp_path / "a", a) == _images(tmp_path / "b", b)
    assert a.seed.nunique() == 6 and set(a.width) == {32} and set(a.model) == {str(world / "sd")}
    assert all((tmp_path / "a" / u).name == f"{s}.png" for u, s in zip(a.uri, a.sha256, strict=True))
    again = generate(cfg, tmp_path / "a", show_progress=False)  # finished: nothing to do
    assert (again.generated, again.reused) == (0, 6)


def test_adding_a_prompt_leaves_every_existing_image_unchanged(world, tmp_path):
    small = read_manifest(
        generate(load_config(_config(tmp_path, world, P)), tmp_path / "a", show_progress=False).manifest
    )
    bigger_cfg = load_config(_config(tmp_path, world, ["a green triangle like a barcode", *P], name="b.yaml"))
    bigger = read_manifest(generate(bigger_cfg, tmp_path / "b", show_progress=False).manifest)
    merged = small.merge(bigger, on="image_id", suffixes=("", "_b"))
    assert len(merged) == 6 and (merged.sha256 == merged.sha256_b).all() and (merged.seed == merged.seed_b).all()


def test_a_run_killed_part_way_resumes_and_ends_identical_to_an_unbroken_run(world, tmp_path):
    prompts = [*P, "a green triangle like a barcode", "a red square with polka dots"]  # 12 images, 6 batches
    path = _config(tmp_path, world, prompts, steps=20, batch_size=2)
    run = tmp_path / "killed"
    out = run / "generate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "generate", "--config", str(path), "--run", str(run)],
                            env=env, stderr=subprocess.DEVNULL)  # fmt: skip
    journal = out / ".journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "manifest.parquet").exists()
    done_before = len(journal.read_text().splitlines())
    resumed = run_local_step(
        "generate", load_config(path), run, resume=True, show_progress=False
    )  # hfi generate --resume
    assert resumed["reused"] >= 4 and resumed["reused"] == done_before - done_before % 2
    assert resumed["generated"] == 12 - resumed["reused"]
    unbroken = generate(load_config(path), tmp_path / "unbroken", show_progress=False)
    a, b = read_manifest(Path(resumed["manifest"])), read_manifest(unbroken.manifest)
    assert a.equals(b) and _images(out, a) == _images(tmp_path / "unbroken", b)
    assert not journal.exists()


def test_generate_cli_runs_the_stage_as_a_step_and_a_second_call_does_nothing(world, tmp_path, capsys):
    path = _config(tmp_path, world, P[:1])
    assert hfi(["generate", "--config", str(path), "--run", str(tmp_path / "run")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["generated"] == 3 and result["reused"] == 0
    assert len(pd.read_parquet(tmp_path / "run" / "generate" / "manifest.parquet")) == 3
    assert (tmp_path / "run" / "generate" / "_SUCCESS").exists()
    assert hfi(["generate", "--config", str(path), "--run", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] is True  # same config, same inputs
    assert hfi(["generate", "--config", str(path), "--run", str(tmp_path / "run"), "--set", "generation.steps=3"]) == 0
    assert json.loads(capsys.readouterr().out)["generated"] == 3  # another setting: drawn again


def test_sld_at_generation_changes_the_images_and_is_recorded(world, tmp_path):
    plain = read_manifest(
        generate(load_config(_config(tmp_path, world, P[:1])), tmp_path / "a", show_progress=False).manifest
    )
    safe_cfg = load_config(_config(tmp_path, world, P[:1], name="sld.yaml", sld="max"))
    safe = read_manifest(generate(safe_cfg, tmp_path / "b", show_progress=False).manifest)
    assert set(safe.sld) == {"max"} and plain.sld.isna().all()
    assert (plain.seed.tolist() == safe.seed.tolist()) and not set(plain.sha256) & set(safe.sha256)


def test_a_model_folder_with_only_pickled_bin_weights_is_refused(world, tmp_path):
    import pytest
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from hfi_core.config import ModelConfig
    from hfi_core.models import load_sd_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(world / "sd", use_safetensors=True)
    pipe.save_pretrained(tmp_path / "bin-only", safe_serialization=False)
    for st in (tmp_path / "bin-only").rglob("*.safetensors"):  # transformers writes safetensors regardless
        torch.save(load_file(st), st.with_name("pytorch_model.bin"))
        st.unlink()
    assert not list((tmp_path / "bin-only").rglob("*.safetensors")) and list((tmp_path / "bin-only").rglob("*.bin"))
    with pytest.raises(ValueError, match=r"bin-only: no .safetensors weights .*loads no pickled \.bin weights"):
        load_sd_pipeline(ModelConfig(path=str(tmp_path / "bin-only")))
