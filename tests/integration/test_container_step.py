"""The CPU step image, built and run for real: a dockerd started here, a Debian base made here
(docker/make-base-image.sh, no registry), docker/Dockerfile.cpu built from it, and the
``hfi_feedback_collection`` DAG (generate -> publish) run by ``airflow dags test`` with
``HFI_STEP_RUNNER=docker``: every step is a ``DockerOperator`` container that talks to the same
moto S3 and MLflow (PostgreSQL) servers as the nightly end-to-end test.

Skips, saying why, only where dockerd cannot start (no binary, or no permission to run it).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
IMAGE = "hfi-step:test"
SECRET = "hfi-secret-7c1f"  # moto takes any credentials; a distinctive one shows where it leaks
# A newer client may shadow Debian's (/usr/local/bin/docker); either speaks to the engine we start.
DOCKER_CLI = shutil.which("docker") or "/usr/bin/docker"


def _docker(sock: str, *args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER_CLI, "-H", sock, *args], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory):
    """A Docker engine of our own (data and exec roots in a temp folder), stopped by PID.

    HFI_TEST_DOCKER_HOST=unix:///... uses an engine already running instead (its build cache
    makes reruns fast while working on the images).
    """
    if os.environ.get("HFI_TEST_DOCKER_HOST"):
        yield os.environ["HFI_TEST_DOCKER_HOST"]
        return
    exe = shutil.which("dockerd")
    if exe is None:
        pytest.skip("dockerd cannot start: no dockerd binary (make test installs Debian's docker.io)")
    root = Path("/tmp") / f"hfi-dockerd-{os.getpid()}"  # short: a unix socket path has a length limit
    root.mkdir(exist_ok=True)
    sock = f"unix://{root}/docker.sock"
    log = open(tmp_path_factory.mktemp("dockerd") / "dockerd.log", "w")
    proc = subprocess.Popen(
        [exe, "--data-root", str(root / "data"), "--exec-root", str(root / "exec"), "-H", sock,
         "--pidfile", str(root / "docker.pid")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"dockerd cannot start (exit {proc.returncode}): {Path(log.name).read_text()[-1500:]}")
        if _docker(sock, "info", timeout=10).returncode == 0:
            break
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.skip(f"dockerd did not answer in 60 s: {Path(log.name).read_text()[-1500:]}")
    yield sock
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    log.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def step_image(dockerd, tmp_path_factory):
    """docker/make-base-image.sh, then docker/Dockerfile.cpu, in a build context of the repository's files (tracked or
    not ignored).

    The context also gets the torch CPU wheel pip found on this machine (so the image never pulls a
    CUDA build) and this machine's CA bundle (docker/ca/, for a TLS-inspecting proxy); both are
    build inputs the Dockerfile documents, and neither is written into the repository.
    """
    base = subprocess.run(
        ["bash", str(ROOT / "docker" / "make-base-image.sh"), "hfi-base:test", dockerd],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert base.returncode == 0, base.stdout[-2000:] + base.stderr[-2000:]
    ctx = tmp_path_factory.mktemp("context")
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, ctx / rel)
    wheels = [p for d in os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split() for p in Path(d).glob("torch-2.13.0*")]
    (ctx / "docker" / "wheels").mkdir(parents=True, exist_ok=True)
    for w in wheels:
        shutil.copy2(w, ctx / "docker" / "wheels" / w.name)
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        (ctx / "docker" / "ca").mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle, ctx / "docker" / "ca" / "host.crt")
    built = _docker(
        dockerd, "build", "--network", "host", "-f", "docker/Dockerfile.cpu", "-t", IMAGE,
        "--build-arg", "BASE_IMAGE=hfi-base:test", ".", cwd=ctx, timeout=1500,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return IMAGE


def test_the_step_image_runs_as_a_non_root_user_with_the_hfi_entrypoint(dockerd, step_image):
    user = _docker(dockerd, "run", "--rm", "--entrypoint", "id", step_image, "-u")
    assert user.returncode == 0 and user.stdout.strip() == "10001", user.stdout + user.stderr
    helped = _docker(dockerd, "run", "--rm", step_image, "step", "--help")
    assert helped.returncode == 0 and "generate" in helped.stdout, helped.stdout + helped.stderr


def test_feedback_collection_dag_runs_its_steps_in_containers_against_s3_and_mlflow(
    dockerd, step_image, services, small_config, free_port, tmp_path
):
    s3 = services["s3_client"]
    config = small_config(tmp_path / "night.yaml")
    s3.upload_file(str(config), services["runs_bucket"], "configs/night.yaml")  # the container sees only S3
    env_file = tmp_path / "hfi.env"  # credentials: worker host file -> container, never through Airflow
    env_file.write_text(f"AWS_ACCESS_KEY_ID={SECRET}\nAWS_SECRET_ACCESS_KEY={SECRET}\nAWS_DEFAULT_REGION=us-east-1\n")
    env_file.chmod(0o644)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "HFI_STEP_RUNNER": "docker",
        "HFI_STEP_RETRIES": "0",  # a failure fails the test now, not after the retry delays
        "HFI_STEP_GPUS": "none",  # this machine has no GPU: no device requests
        "HFI_IMAGE": step_image,
        "HFI_DOCKER_URL": dockerd,
        "HFI_DOCKER_NETWORK": "host",  # moto and MLflow listen on the host's 127.0.0.1
        "HFI_DOCKER_ENV_FILE": str(env_file),
        "MLFLOW_TRACKING_URI": services["mlflow"],
        "HFI_S3_ENDPOINT_URL": services["s3"],
        "HFI_EXPERIMENT": "hfi-container",
        "HFI_GIT_COMMIT": "test-commit",
        "HFI_IMAGE_TAG": step_image,
    }
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)  # the worker itself holds no credentials: only the env file does
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    run_name = "container__collect"
    conf = {
        "config": f"s3://{services['runs_bucket']}/configs/night.yaml",
        "run_root": f"s3://{services['runs_bucket']}/runs",
        "run_name": run_name,
    }
    result = subprocess.run(
        [str(BIN / "airflow"), "dags", "test", "hfi_feedback_collection", "--conf", json.dumps(conf)],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    log = result.stdout + result.stderr
    (tmp_path / "dags_test.log").write_text(log)
    failed = [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line or "Error:" in line]
    assert result.returncode == 0, "\n".join(failed[:40]) + "\n...\n" + log[-3000:]
    assert SECRET not in log  # the credentials never reached Airflow's logs

    prefix = f"runs/{run_name}/"
    keys = {
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=services["runs_bucket"], Prefix=prefix)
        for o in page.get("Contents", [])
    }
    for rel in ("generate/_SUCCESS", "generate/manifest.parquet", "publish/_SUCCESS", "publish/tasks.json"):
        assert prefix + rel in keys, rel
    pngs = [k for k in keys if k.startswith(prefix + "generate/images/") and k.endswith(".png")]
    assert len(pngs) == 5 * 3 * 4  # 5 groups x 3 prompts x 4 images, drawn inside the container

    client = MlflowClient(services["mlflow"])
    exp = client.get_experiment_by_name("hfi-container")
    children = client.search_runs([exp.experiment_id], "tags.`hfi.level` != 'parent'")
    by_stage = {c.data.tags.get("hfi.stage"): c for c in children}
    assert set(by_stage) == {"generate", "publish"}
    for stage, run in by_stage.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["airflow.dag_id"] == "hfi_feedback_collection"
        assert run.data.tags["airflow.task_id"] == stage
        assert run.data.tags.get("image_tag") == step_image
