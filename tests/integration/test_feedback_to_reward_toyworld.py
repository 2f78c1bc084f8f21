"""Issue #3's bar: the shipped toy-world config, 3 simulated annotators at 10% noise, 432
images, through the same stage commands people run (`hfi generate`, `hfi feedback export /
simulate / ingest`, `hfi reward train`); the reward model's held-out AUC against the oracle's
truth must be >= 0.95."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hfi_core.images import load_images
from hfi_core.metrics import roc_auc
from hfi_core.toyworld import default_world
from hfi_core.toyworld.oracle import Oracle
from tasks.cli import main as hfi

CONFIG = str(Path(__file__).parents[2] / "configs" / "toyworld-striped.yaml")


def ok(*args: object) -> None:
    """Run one `hfi` command as a user would; it must succeed."""
    assert hfi([str(a) for a in args]) == 0, args


@pytest.fixture(scope="module")
def run(tmp_path_factory, world):
    root = tmp_path_factory.mktemp("run")
    run = root / "night1"
    ok("generate", "--config", CONFIG, "--run", run)
    ok("feedback", "export", "--config", CONFIG, "--run", run)
    ok("feedback", "simulate", "--config", CONFIG, "--run", run, "--out", root / "ls" / "export.json")
    ok("feedback", "ingest", "--config", CONFIG, "--run", run, "--source", root / "ls" / "export.json")
    ok("reward", "train", "--config", CONFIG, "--run", run)
    return run


def test_export_writes_one_task_per_image_and_a_binary_labeling_config(run):
    tasks = json.loads((run / "publish" / "tasks.json").read_text())
    manifest = pd.read_parquet(run / "generate" / "manifest.parquet")
    assert len(tasks) == len(manifest) == 432
    assert {t["data"]["image_id"] for t in tasks} == set(manifest.image_id)
    xml = (run / "publish" / "label_config.xml").read_text()
    assert '<Choice value="striped"' in xml and '<Choice value="not striped"' in xml
    assert (run / "feedback" / "raw").is_dir() and (run / "reward" / "_SUCCESS").exists()


def test_simulated_labels_have_three_annotators_and_about_ten_percent_disagreement(run):
    labels = pd.read_parquet(run / "feedback" / "labels.parquet")
    assert len(labels) == 432 and set(labels.n_annotators) == {3}
    # with p = 0.1 per label, an image's 3 votes all agree with probability 0.9^3 + 0.1^3 = 0.73
    unanimous = (labels.agreement == 1).mean()
    assert 0.65 < unanimous < 0.81


def test_reward_model_held_out_auc_against_the_oracles_truth_is_at_least_0_95(run):
    metrics = json.loads((run / "reward" / "metrics.json").read_text())
    # 7 of the 36 prompts (20%) are held out, with all their images: no prompt on both sides
    assert metrics["embedded"] == 432 and metrics["holdout_n"] == 7 * 12 and metrics["holdout_prompts"] == 7
    scores = pd.read_parquet(run / "reward" / "scores.parquet")
    held = scores[scores.split == "holdout"]
    manifest = (
        pd.read_parquet(run / "generate" / "manifest.parquet").set_index("image_id").loc[held.image_id].reset_index()
    )
    oracle = Oracle.from_pretrained(default_world() / "oracle")
    truth = np.array(oracle.predict(load_images(manifest, run / "generate"))["style"]) == "striped"
    assert 0.2 < truth.mean() < 0.8  # both classes well represented
    auc = roc_auc(held.score.to_numpy(), truth)
    print(f"held-out AUC vs oracle truth: {auc:.4f} (vs noisy human majority: {metrics.get('holdout_auc')})")
    assert auc >= 0.95
    assert (run / "reward" / "roc.png").stat().st_size > 5000


def test_retraining_with_ten_percent_new_labels_embeds_only_the_new_images(run, tmp_path):
    # A second night: 42 new images (10%) from another seed, content-addressed into the same
    # image folder, one manifest for both nights, labels ingested beside the first night's.
    from hfi_core.config import load_config
    from hfi_core.feedback.ingest import IngestSettings, ingest
    from hfi_core.feedback.labelstudio import image_urls, local_files_prefix
    from hfi_core.feedback.simulate import simulate_export
    from hfi_core.generation import generate
    from hfi_core.reward import train_reward

    base = load_config(CONFIG)
    prompts = [ps.model_copy(update={"images_per_prompt": 2 if k == 0 else 1}) for k, ps in enumerate(base.prompts)]
    night2 = base.model_copy(update={"prompts": prompts, "generation": base.generation.model_copy(update={"seed": 99})})
    new = pd.read_parquet(generate(night2, tmp_path / "gen", show_progress=False).manifest)
    assert len(new) == 42  # 12 + 5 x 6
    for uri in new.uri:
        shutil.copyfile(tmp_path / "gen" / uri, run / "generate" / uri)
    both = pd.concat([pd.read_parquet(run / "generate" / "manifest.parquet"), new], ignore_index=True)

    fb, sim = base.feedback, base.feedback.simulate.model_copy(update={"seed": 1})
    urls = image_urls(new.to_dict("records"), local_files_prefix(str(tmp_path / "gen")))
    tasks = simulate_export(new, tmp_path / "gen", sim, kind=fb.kind, positive=fb.positive_choice,
                            negative=fb.negative_choice, url_of=urls, ranking_group=fb.ranking_group)  # fmt: skip
    for t in tasks:  # a second Label Studio project: its annotation ids differ from the first's
        for a in t["annotations"]:
            a["id"] = f"night2-{a['id']}"
    export = tmp_path / "night2_export.json"
    export.write_text(json.dumps(tasks))
    feedback = tmp_path / "feedback"
    shutil.copytree(run / "feedback", feedback)  # the first night's raw exports stay in
    settings = IngestSettings(fb.kind, fb.positive_choice, fb.negative_choice, None, fb.max_file_mb)
    ingest(both, [export], feedback, settings)
    assert len(pd.read_parquet(feedback / "labels.parquet")) == 474
    metrics = train_reward(base.reward, both, run / "generate", feedback, tmp_path / "reward2",
                           cache_dir=run / "embedding_cache")  # fmt: skip
    assert metrics["embedded"] == 42


def test_reward_score_ranks_striped_images_above_the_rest(run, tmp_path):
    m = run / "generate" / "manifest.parquet"
    out = tmp_path / "scores.parquet"
    ok("reward", "score", "--model", str(run / "reward" / "model"), "--manifest", str(m), "--out", str(out))
    scores = pd.read_parquet(out).merge(pd.read_parquet(run / "feedback" / "labels.parquet"), on="image_id")
    assert len(scores) == 432
    assert scores[scores.majority == 1].reward.mean() > scores[scores.majority == 0].reward.mean() + 0.5


def test_ranking_feedback_trains_a_reward_that_ranks_held_out_images_by_the_oracles_truth(run, tmp_path):
    # The toy config ranks images across prompts (ranking_group: batch): this model draws every
    # image of one prompt alike, so rankings within a prompt would hold nothing but noise.
    ranked = tmp_path / "ranked"  # another run on the same images and embedding cache
    shutil.copytree(run / "generate", ranked / "generate")
    shutil.copytree(run / "embedding_cache", ranked / "embedding_cache")
    kind = ["--set", "feedback.kind=ranking"]
    export = tmp_path / "ranking.json"
    ok("feedback", "simulate", "--config", CONFIG, "--run", ranked, *kind, "--out", export)
    ok("feedback", "ingest", "--config", CONFIG, "--run", ranked, *kind, "--source", export)
    ok("reward", "train", "--config", CONFIG, "--run", ranked, *kind)
    m = str(ranked / "generate" / "manifest.parquet")
    cache = str(ranked / "embedding_cache")
    out = ranked / "reward"
    pairs = pd.read_parquet(ranked / "feedback" / "pairs.parquet")
    assert len(pairs) == 108 * 3 * 6  # 432 images in 108 tasks of 4, 3 annotators, 6 pairs each
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "ranking" and metrics["embedded"] == 0  # every image was cached already
    table = pd.read_parquet(out / "scores.parquet")
    held = sorted(set(table[table.split == "holdout"].image_pos) | set(table[table.split == "holdout"].image_neg))
    trained = set(table[table.split == "train"].image_pos) | set(table[table.split == "train"].image_neg)
    assert held and not set(held) & trained
    ok(
        "reward",
        "score",
        "--model",
        str(out / "model"),
        "--manifest",
        m,
        "--cache",
        cache,
        "--out",
        str(tmp_path / "s.parquet"),
    )
    scores = pd.read_parquet(tmp_path / "s.parquet").set_index("image_id").loc[held]
    manifest = pd.read_parquet(m).set_index("image_id").loc[held].reset_index()
    oracle = Oracle.from_pretrained(default_world() / "oracle")
    truth = np.array(oracle.predict(load_images(manifest, ranked / "generate"))["style"]) == "striped"
    auc = roc_auc(scores.reward.to_numpy(), truth)
    print(
        f"ranking reward: held-out AUC vs oracle truth {auc:.4f}, pair accuracy {metrics['holdout_pair_accuracy']:.3f}"
    )
    assert auc >= 0.95
