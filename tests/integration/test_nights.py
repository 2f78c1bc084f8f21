"""Two nights in one run store: the images of night 1 are reused, not redrawn; feedback piles up
in the concept's inbox and each night ingests all of it, every annotation once; an unchanged
inbox skips the feedback step and a new export re-runs it; a bad export never enters the inbox."""

import json

import pandas as pd
import pytest

from hfi_core.config import load_config
from hfi_core.feedback.labelstudio import FeedbackError
from hfi_core.stages import STAGES, _evaluation_key
from hfi_core.steps import run_local_step
from hfi_core.store import ImagePool, Inbox, LocalStore


@pytest.fixture(scope="module")
def nights(world, small_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    path = small_config(root / "night.yaml")
    one = load_config(path)
    two = load_config(path, {"generation.images_per_prompt": 5})  # one more image per prompt: +25%
    out = {}
    for name, cfg in (("night-1", one), ("night-2", two)):
        out[name] = {s: run_local_step(s, cfg, root / name, show_progress=False) for s in STAGES}
    return {"root": root, "one": one, "two": two, **out}


def _manifest(root, night):
    return pd.read_parquet(root / night / "generate" / "manifest.parquet")


def test_night_two_draws_only_its_new_images_and_reuses_the_same_bytes(nights):
    root = nights["root"]
    first, second = _manifest(root, "night-1"), _manifest(root, "night-2")
    assert len(first) == 72 and len(second) == 90  # 18 prompts x 4, then x 5
    assert nights["night-2"]["generate"]["reused"] == 72 and nights["night-2"]["generate"]["generated"] == 18
    assert set(first.image_id) < set(second.image_id)
    again = second.set_index("image_id").loc[first.image_id]
    assert list(again.sha256) == list(first.sha256)  # the labelled image is the trained-on image
    for uri in first.uri:
        assert (root / "night-1" / "generate" / uri).read_bytes() == (root / "night-2" / "generate" / uri).read_bytes()
    assert ImagePool(LocalStore(str(root))).ids() == set(second.image_id)


def test_feedback_accumulates_in_the_inbox_and_night_two_trains_on_the_union(nights):
    root = nights["root"]
    inbox = Inbox(LocalStore(str(root)), "striped")
    keys = inbox.keys()
    assert len(keys) == 2 and all(k.startswith("feedback/striped/inbox/") for k in keys)
    first = json.loads((root / keys[0]).read_bytes())
    second = json.loads((root / keys[1]).read_bytes())
    sizes = sorted([len(first), len(second)])
    assert sizes == [18, 72]  # night 2's annotators labelled only the 18 new images
    labels = pd.read_parquet(root / "night-2" / "feedback" / "labels.parquet")
    assert set(labels.image_id) == set(_manifest(root, "night-2").image_id)
    assert (labels.n_votes == 3).all() and (labels.n_annotators == 3).all()  # each annotation once
    assert nights["night-2"]["feedback"]["labels"] == 90 * 3
    assert nights["night-1"]["feedback"]["exports_added"] == 1 and nights["night-2"]["feedback"]["exports_added"] == 1


def test_an_unchanged_inbox_skips_the_step_and_a_new_export_reruns_it(nights):
    root, cfg = nights["root"], nights["two"]
    again = run_local_step("feedback", cfg, root / "night-2", show_progress=False)
    assert again["skipped"] is True  # nobody labelled anything new
    # A later export from Label Studio: one more vote on an image already labelled three times.
    manifest = _manifest(root, "night-2")
    image = manifest.image_id[0]
    export = [
        {
            "id": 1,
            "data": {"image_id": image},
            "annotations": [
                {"id": 777, "completed_by": 9, "result": [{"type": "choices", "from_name": "concept",
                                                          "value": {"choices": ["striped"]}}]},
            ],
        }
    ]  # fmt: skip
    Inbox(LocalStore(str(root)), "striped").add(json.dumps(export).encode())
    rerun = run_local_step("feedback", cfg, root / "night-2", show_progress=False)
    assert "skipped" not in rerun and rerun["labels"] == 90 * 3 + 1
    labels = pd.read_parquet(root / "night-2" / "feedback" / "labels.parquet").set_index("image_id")
    assert labels.loc[image, "n_votes"] == 4


def test_a_bad_export_is_refused_by_name_and_never_enters_the_inbox(nights, tmp_path):
    root = nights["root"]
    bad = tmp_path / "export.json"
    bad.write_text(json.dumps([{"id": 1, "data": {"image_id": "img_nope"}, "annotations": [
        {"id": 5, "completed_by": 1, "result": [{"type": "choices", "from_name": "concept",
                                                 "value": {"choices": ["striped"]}}]}]}]))  # fmt: skip
    before = Inbox(LocalStore(str(root)), "striped").keys()
    cfg = nights["two"].model_copy(
        update={"feedback": nights["two"].feedback.model_copy(update={"source": "files", "files": [str(bad)]})}
    )
    with pytest.raises(FeedbackError, match=r"export.json: record 0, field 'data.image_id': unknown image id"):
        run_local_step("feedback", cfg, root / "night-2", show_progress=False)
    assert Inbox(LocalStore(str(root)), "striped").keys() == before
    assert bad.read_text().startswith("[{")  # the raw input is left as it was


def test_the_base_model_is_evaluated_once_per_store_and_every_night_reads_it_back(nights):
    from hfi_core.evaluation import Variant

    root = nights["root"]
    entries = sorted(p.parent.name for p in (root / "cache" / "evaluate").glob("*/_SUCCESS"))
    key = _evaluation_key(nights["one"], Variant("sd"))
    assert entries == [key]  # night 2 asked for more images, not for another evaluation
    assert _evaluation_key(nights["two"], Variant("sd")) == key
    other = nights["two"].model_copy(update={"evaluate": nights["two"].evaluate.model_copy(update={"seed": 7})})
    assert _evaluation_key(other, Variant("sd")) != key
    one, two = (json.loads((root / n / "evaluate" / "summary.json").read_text()) for n in ("night-1", "night-2"))
    assert one["sd"] == two["sd"] and set(two) == {"sd", "distilled"}
    # Without a registry there is no champion to challenge: the verdict says so.
    reg = json.loads((root / "night-2" / "register" / "registration.json").read_text())
    assert reg["champion"] is False and reg["reason"].startswith("not tracked")


def test_a_distill_step_killed_mid_run_resumes_from_the_stores_checkpoint_bit_for_bit(nights, tmp_path):
    """Under the step runner, as the DAGs run it: SIGKILL once a checkpoint is in the store, retry."""
    import hashlib
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    cfg_path = tmp_path / "long.yaml"
    data = yaml.safe_load((nights["root"] / "night.yaml").read_text())
    data["distill"].update(steps=90, checkpoint_every=3)
    cfg_path.write_text(yaml.safe_dump(data))
    for night in ("unbroken", "killed"):
        for dep in ("generate", "feedback", "reward", "invert"):
            shutil.copytree(nights["root"] / "night-1" / dep, tmp_path / "store" / night / dep)
    hfi = Path(sys.executable).parent / "hfi"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"OMP_NUM_THREADS": "1"}

    def step(night: str) -> subprocess.Popen:
        argv = [str(hfi), "step", "distill", "--config", str(cfg_path), "--run-uri", str(tmp_path / "store" / night)]
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    assert step("unbroken").wait(timeout=600) == 0
    killed = step("killed")
    checkpoints = tmp_path / "store" / "killed" / ".checkpoints" / "distill"
    deadline = time.time() + 300
    while not list(checkpoints.glob("*.pt")) and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL, "the step ended before it could be killed"
    assert not (tmp_path / "store" / "killed" / "distill" / "_SUCCESS").exists()
    retry = step("killed")
    out, _ = retry.communicate(timeout=600)
    assert retry.returncode == 0, out[-2000:]
    metrics = json.loads((tmp_path / "store" / "killed" / "distill" / "metrics.json").read_text())
    assert 0 < metrics["steps_run"] < 90  # it resumed: only the steps after the checkpoint ran again

    def weights(night: str) -> dict[str, str]:
        folder = tmp_path / "store" / night / "distill"
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in folder.rglob("*.safetensors")}  # fmt: skip

    assert weights("killed") == weights("unbroken") and len(weights("unbroken")) >= 2
    assert not list(checkpoints.glob("*")), "the finished step's checkpoints are left in the store"
    marker = json.loads((tmp_path / "store" / "killed" / "distill" / "_SUCCESS").read_text())
    assert not any(k.startswith("checkpoint/") for k in marker["outputs"])


def test_with_mlflow_refusing_or_hung_a_step_still_commits_and_register_fails_to_be_retried(nights, tmp_path):
    """A closed port and a server that accepts and never answers, with the step's own MLflow
    limits (tasks/step.py MLFLOW_LIMITS: about 65 s per call, at most two such waits)."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    from tasks.step import MLFLOW_LIMITS

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(hung.accept()) for _ in range(64)], daemon=True).start()

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"OMP_NUM_THREADS": "1"}
    hfi = str(Path(sys.executable).parent / "hfi")
    config = str(nights["root"] / "night.yaml")
    procs = {}
    for case, port in (("closed", closed_port), ("hung", hung.getsockname()[1])):
        for name, deps in (("publish", ("generate",)), ("register", ("generate", "distill", "evaluate"))):
            night = tmp_path / f"{case}-{name}"
            for dep in deps:
                shutil.copytree(nights["root"] / "night-1" / dep, night / dep)
            argv = [hfi, "step", name, "--config", config, "--run-uri", str(night),
                    "--tracking-uri", f"http://127.0.0.1:{port}"]  # fmt: skip
            procs[case, name] = (night, subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                                         stderr=subprocess.PIPE, text=True))  # fmt: skip
    t0 = time.time()
    bound = 2 * (int(MLFLOW_LIMITS["MLFLOW_HTTP_REQUEST_TIMEOUT"]) + 5) * 3 + 60  # two waits, and start-up
    for (_case, name), (night, proc) in procs.items():
        out, err = proc.communicate(timeout=bound)
        if name == "publish":
            assert proc.returncode == 0, err[-2000:]
            marker = json.loads((night / "publish" / "_SUCCESS").read_text())
            assert marker["mlflow_run_id"] is None and len(marker["tracking"]) == 1
            warning = [line for line in err.splitlines() if "untracked" in line]
            assert len(warning) == 1 and len(warning[0]) < 400, err[-2000:]
            assert "could not open its MLflow runs" in warning[0]
        else:  # the registry is its work: it fails, with an ordinary error Airflow retries
            assert proc.returncode not in (0, 2), err[-2000:]
            assert not (night / "register" / "_SUCCESS").exists()
    assert time.time() - t0 < bound
    hung.close()


def test_register_whose_marker_put_fails_is_retried_into_the_same_version_and_alias(nights, tmp_path):
    """The registration happened, then the marker's PUT failed: the retry adds no second version
    and leaves the champion alias where the first attempt put it."""
    import shutil

    from mlflow.tracking import MlflowClient

    from hfi_core.steps import TrackingContext, run_step

    for dep in ("generate", "distill", "evaluate"):
        shutil.copytree(nights["root"] / "night-1" / dep, tmp_path / "store" / "night-r" / dep)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = TrackingContext(uri, "hfi-retry", "dag/night-r", {}, (tmp_path / "artifacts").as_uri())

    class MarkerPutFails(LocalStore):
        fail = True

        def write_bytes(self, key, data):
            if key.endswith("register/_SUCCESS") and self.fail:
                MarkerPutFails.fail = False
                raise ConnectionError("the marker PUT was cut off")
            return super().write_bytes(key, data)

    store = MarkerPutFails(str(tmp_path / "store"))
    with pytest.raises(ConnectionError):
        run_step("register", nights["one"], store, "night-r", tmp_path / "store" / "night-r", tracking)
    client = MlflowClient(uri)
    name = nights["one"].promotion.model_name
    first = client.search_model_versions(f"name = '{name}'")
    assert len(first) == 1 and store.success("night-r/register") is None
    alias = client.get_registered_model(name).aliases
    again = run_step("register", nights["one"], store, "night-r", tmp_path / "store" / "night-r", tracking)
    assert again["version"] == first[0].version and store.success("night-r/register")["model"] == "toyworld:sd"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert client.get_registered_model(name).aliases == alias
    child = client.search_runs(
        [client.get_experiment_by_name("hfi-retry").experiment_id], "tags.`hfi.stage` = 'register'"
    )
    assert len(child) == 1 and child[0].info.status == "FINISHED"  # the failed attempt's run, reused
    # The promoted model's trained values are kept where the next night's distill.warm_start finds them.
    from hfi_core.stages import CHAMPION_FILE, _champion_key
    from hfi_core.store import FolderCache

    assert FolderCache(store, "champions").get(_champion_key(nights["one"]), tmp_path / "champion")
    assert json.loads((tmp_path / "champion" / CHAMPION_FILE).read_text()) == {"version": first[0].version,
                                                                               "run": "night-r"}  # fmt: skip


def test_night_two_continues_night_ones_tokens_for_fewer_steps(nights):
    root, ic = nights["root"], nights["two"].invert
    assert ic.warm_start and ic.warm_steps < ic.steps
    first = json.loads((root / "night-1" / "invert" / "tokens.json").read_text())["tokens"]
    second = json.loads((root / "night-2" / "invert" / "tokens.json").read_text())["tokens"]
    assert all(t["warm_from"] is None and t["steps"] == ic.steps for t in first)  # nothing earlier to continue
    assert nights["night-2"]["invert"]["warm_started"] >= 1
    for t in second:  # a continued look trains warm_steps steps, from the token it continues
        assert t["steps"] == (ic.warm_steps if t["warm_from"] else ic.steps)
        assert t["warm_from"] in {None, *(f["token"] for f in first)}
    looks = json.loads((root / "night-2" / "invert" / "looks.json").read_text())
    assert set(looks) <= set(_manifest(root, "night-2").image_id)


def test_a_warm_started_night_continues_the_champion_for_warm_steps(nights):
    """``distill.warm_start``: a night continues the trained values ``register`` kept for the
    last promoted model (here night 1's, kept as register keeps them), for ``warm_steps``."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from hfi_core.distill.outputs import DELTA
    from hfi_core.models import load_sd_pipeline
    from hfi_core.stages import StageContext, _keep_champion

    root, two = nights["root"], nights["two"]
    upstream = [s for s in STAGES if s not in ("distill", "evaluate", "register")]
    for s in upstream:
        shutil.copytree(root / "night-2" / s, root / "night-w" / s)
    # lr 1e-9: three AdamW steps move a value by about 3e-9, so the result is where it started.
    warm = two.model_copy(update={"distill": two.distill.model_copy(update={"warm_start": True, "warm_steps": 3,
                                                                             "lr": 1e-9})})  # fmt: skip
    store = LocalStore(str(root))
    cold = run_local_step("distill", warm, root / "night-w", show_progress=False)
    assert cold["warm_started"] is False and cold["steps_run"] == two.distill.steps  # no champion yet: from the base
    _keep_champion(warm, root / "night-1", StageContext.on(store, warm), version="7")
    shutil.rmtree(root / "night-w" / "distill")
    result = run_local_step("distill", warm, root / "night-w", show_progress=False)
    assert result["warm_started"] is True and result["steps_run"] == 3
    assert json.loads((root / "night-w" / "distill" / "card.json").read_text())["warm_from"] == "7"
    champion, got = load_file(root / "night-1" / "distill" / DELTA), load_file(root / "night-w" / "distill" / DELTA)
    base = dict(load_sd_pipeline(two.model, "ddim").unet.named_parameters())
    assert set(got) == set(champion)
    assert all(torch.allclose(got[n], champion[n], atol=1e-6) for n in got)  # started from the champion...
    assert any(not torch.allclose(champion[n], base[n].detach(), atol=1e-4) for n in got)  # ...which is not the base
