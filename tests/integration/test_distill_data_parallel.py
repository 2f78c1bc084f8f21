"""SDD data-parallel over 2 CPU processes (gloo, through accelerate) on the committed toy world, against
the one-process run: the same number of rollouts, a loss curve within noise, one EMA teacher
on every process, and a saved UNet that loads."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("distill_replica.py")
ROOT = Path(__file__).parents[2]


def _processes(argv: list[str], n: int, rendezvous: Path, ok: bool = True) -> list[str]:
    """``n`` processes of ``python argv``, with the environment a launcher gives each (RANK,
    WORLD_SIZE, LOCAL_RANK), meeting through a file: torchrun's and accelerate launch's TCP store
    listens on every interface, and tests listen on 127.0.0.1 only (gloo too: ``lo``). Returns
    each process's stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    group = {"WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "HFI_DIST_INIT_METHOD": rendezvous.as_uri(),
             "GLOO_SOCKET_IFNAME": "lo"}  # fmt: skip
    envs = [{**env, **group, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(n)] if n > 1 else [env]
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=e) for e in envs]  # fmt: skip
    errors = [p.communicate(timeout=900)[1] for p in procs]
    for p, err in zip(procs, errors, strict=True):
        assert (p.returncode == 0) == ok, err[-3000:]
    return errors


@pytest.fixture(scope="module")
def runs(tmp_path_factory, world):
    root = tmp_path_factory.mktemp("dp")
    _processes([str(WORKER), str(root / "one")], 1, root / "rendezvous-1")
    _processes([str(WORKER), str(root / "two")], 2, root / "rendezvous-2")
    one = json.loads((root / "one" / "rank0.json").read_text())
    two = [json.loads((root / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return root, one, two


def test_two_processes_roll_out_as_many_trajectories_as_one(runs):
    _, one, two = runs
    assert one["world"] == 1 and [t["world"] for t in two] == [2, 2]
    assert one["trajectories"] == 24 * 4  # steps x batch
    assert [t["trajectories"] for t in two] == [24 * 2, 24 * 2]  # each process half of every step's batch


def test_every_process_ends_with_the_same_ema_teacher_and_the_same_averaged_losses(runs):
    _, _, two = runs
    assert two[0]["teacher"] == two[1]["teacher"]  # averaged gradients: one student, one EMA
    assert two[0]["losses"] == two[1]["losses"]


def test_the_loss_curve_stays_within_noise_of_the_one_process_run(runs):
    _, one, two = runs
    a, b = np.array(one["losses"]), np.array(two[0]["losses"])
    assert len(a) == len(b) == 24 and not np.array_equal(a, b)  # other noise, as another seed
    spread = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert abs(a.mean() - b.mean()) < 3 * spread, (a.mean(), b.mean(), spread)


def test_the_saved_teacher_loads(runs):
    from diffusers import UNet2DConditionModel

    root, _, _ = runs
    unet = UNet2DConditionModel.from_pretrained(root / "two" / "teacher", use_safetensors=True)
    assert unet.config.cross_attention_dim == 64


def test_hfi_distill_as_a_two_process_step_commits_once_from_process_0(tmp_path, world, small_config):
    """The step as the DAGs launch it on a node of several GPUs (one process per GPU), on 2 CPUs."""
    from diffusers import UNet2DConditionModel

    from tasks.cli import main as hfi

    cfg = small_config(tmp_path / "small.yaml")
    run = tmp_path / "night"
    for command in (["generate"], ["feedback", "ingest"], ["reward", "train"], ["invert"]):
        assert hfi([*command, "--config", str(cfg), "--run", str(run)]) == 0
    _processes(["-m", "tasks.cli", "distill", "--config", str(cfg), "--run-dir", str(run), "--set",
                "distill.batch_size=2"], 2, tmp_path / "rendezvous")  # fmt: skip
    marker = json.loads((run / "distill" / "_SUCCESS").read_text())
    assert "unet/diffusion_pytorch_model.safetensors" in marker["outputs"]
    assert not list(run.glob(".replica-*"))  # process 1 trained in a folder of its own, then removed it
    metrics = json.loads((run / "distill" / "metrics.json").read_text())
    assert metrics["steps_run"] == 6 and "replica" not in metrics
    UNet2DConditionModel.from_pretrained(run / "distill" / "unet", use_safetensors=True)
    # Only distill trains data-parallel: another stage launched as 2 processes is refused, in one line.
    errors = _processes(["-m", "tasks.cli", "evaluate", "--config", str(cfg), "--run-dir", str(run)], 2,
                        tmp_path / "rendezvous-evaluate", ok=False)  # fmt: skip
    assert all("launched as 2 processes, but only ['distill'] train data-parallel" in e for e in errors)
