"""Two nights as a platform team runs them, through Airflow's own scheduler (not ``dags test``).

Started here, bound to 127.0.0.1 and stopped by PID:

- Airflow 3: scheduler (LocalExecutor, no log server), dag-processor and api-server, on a
  PostgreSQL metadata database at 127.0.0.1:5432; every step is a ``DockerOperator`` container
  of the CPU step image (docker/Dockerfile.cpu, built here FROM a Debian base made here);
- MLflow: a tracking server on PostgreSQL, its artifacts in moto's S3 server;
- moto's S3 server: the run store (images, inbox, nights) and the production config;
- Label Studio 1.23.2 from its own virtual environment (``make labelstudio``).

Night 1: the collection DAG is triggered through the REST API; it publishes the batch to Label
Studio, where the simulated annotators (each a Label Studio user) label 60% of it through the
API. The collection DAG's pull finds the labels, adds the export to the inbox and records the
asset event, and the scheduler starts the removal DAG on it (nobody triggers it). Night 2: the
annotators label the rest, and an operator triggers the removal DAG through the REST API; it
trains on the union. Scheduled and asset-triggered runs take the deployment's config
(``HFI_CONFIG``), as in production.

Skips, saying why, only where dockerd cannot start.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import mlflow.artifacts
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from hfi_core.config import load_config
from hfi_core.stages import headline_keys

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
IMAGE = "hfi-step:test"
SECRET = "hfi-secret-7c1f"  # moto takes any credentials; a distinctive one shows where it leaks
LS_TOKEN = "hfi-e2e-token-5d2a"
LS_BIN = ROOT / ".venv-labelstudio" / "bin" / "label-studio"
# A newer client may shadow Debian's (/usr/local/bin/docker); either speaks to the engine we start.
DOCKER_CLI = shutil.which("docker") or "/usr/bin/docker"
STEPS = ("generate", "publish", "feedback", "reward", "invert", "distill", "evaluate", "register")


def _docker(sock: str, *args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER_CLI, "-H", sock, *args], capture_output=True, text=True, timeout=timeout, **kw)


def _listeners() -> set[str]:
    """``address:port`` of every listening TCP socket on this machine."""
    out = subprocess.run(["ss", "-Htln"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines() if line.strip()}


def _wait_http(url: str, what: str, proc: subprocess.Popen, log: Path, timeout: float, headers=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            if urllib.request.urlopen(req, timeout=2).status < 500:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"{what} did not answer {url} in {timeout:.0f} s: {log.read_text()[-2000:]}")


def _start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


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
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    proc = _start([exe, "--data-root", str(root / "data"), "--exec-root", str(root / "exec"), "-H", sock,
                   "--pidfile", str(root / "docker.pid")], dict(os.environ), log)  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"dockerd cannot start (exit {proc.returncode}): {log.read_text()[-1500:]}")
        if _docker(sock, "info", timeout=10).returncode == 0:
            break
        time.sleep(0.5)
    else:
        _stop(proc)
        pytest.skip(f"dockerd did not answer in 60 s: {log.read_text()[-1500:]}")
    yield sock
    _stop(proc)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def step_image(dockerd, tmp_path_factory):
    """docker/make-base-image.sh, then docker/Dockerfile.cpu, in a build context of the
    repository's files (tracked or not ignored).

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


@pytest.fixture(scope="module")
def labelstudio(free_port, tmp_path_factory):
    """Label Studio from its own venv, on 127.0.0.1 (``--internal-host``: ``--host`` alone binds
    0.0.0.0), offline, with a legacy token so that the API answers a fixed token."""
    if not LS_BIN.exists():
        pytest.fail(f"{LS_BIN} is missing: run `make labelstudio` (make test does)")
    port = free_port()
    data = tmp_path_factory.mktemp("labelstudio")
    env = {
        **os.environ, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "0", "LATEST_VERSION_CHECK": "0",
    }  # fmt: skip
    log = data / "server.log"
    proc = _start([str(LS_BIN), "start", "--internal-host", "127.0.0.1", "-p", str(port), "--no-browser",
                   "--data-dir", str(data / "data"), "--username", "admin@hfi.local", "--password", "hfi-e2e-pw",
                   "--user-token", LS_TOKEN, "--enable-legacy-api-token"], env, log)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/api/projects", "label-studio", proc, log, 300, {"Authorization": f"Token {LS_TOKEN}"})
    yield url
    _stop(proc)


def _psql(sql: str) -> None:
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql],
                   check=True, capture_output=True)  # fmt: skip


class Airflow:
    """The api-server's REST API, as an operator's script uses it (a user, a password, a JWT)."""

    def __init__(self, url: str, user: str, password: str) -> None:
        self.url = url
        body = json.dumps({"username": user, "password": password}).encode()
        req = urllib.request.Request(f"{url}/auth/token", body, {"Content-Type": "application/json"})
        self.token = json.loads(urllib.request.urlopen(req, timeout=30).read())["access_token"]

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        req = urllib.request.Request(f"{self.url}/api/v2{path}", data, headers, method=method)
        return json.loads(urllib.request.urlopen(req, timeout=30).read())

    def runs(self, dag_id: str) -> list[dict]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns?order_by=start_date")["dag_runs"]

    def wait(self, dag_id: str, run_id: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            run = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(5)
        raise AssertionError(f"{dag_id} {run_id} did not end in {timeout:.0f} s")

    def failures(self, dag_id: str, run_id: str) -> list[str]:
        tis = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return [f"{t['task_id']}={t['state']}" for t in tis if t["state"] not in ("success", "skipped")]


@pytest.fixture(scope="module")
def nights(dockerd, step_image, services, labelstudio, small_config, free_port, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scheduler")
    s3, bucket = services["s3_client"], services["runs_bucket"]
    # The production config lives in the store, as a deployment keeps it: Label Studio feedback.
    config = small_config(tmp / "production.yaml")
    cfg = yaml.safe_load(config.read_text())
    cfg["feedback"].update(source="labelstudio", labelstudio={"url": labelstudio})
    config.write_text(yaml.safe_dump(cfg))
    s3.upload_file(str(config), bucket, "configs/production.yaml")
    # A tracking URI with a user part, as a server behind basic auth needs: the secret in it
    # must reach the step through the env file only, never Airflow's rendered environment.
    tracking = services["mlflow"].replace("http://", f"http://hfi-e2e:{SECRET}@", 1)
    env_file = tmp / "hfi.env"  # credentials: worker host file -> container, never through Airflow
    # The access key id is an identifier, not a secret: presigned image URLs carry it by design.
    env_file.write_text(f"AWS_ACCESS_KEY_ID=hfi-e2e-key\nAWS_SECRET_ACCESS_KEY={SECRET}\nAWS_DEFAULT_REGION=us-east-1\n"
                        f"LABEL_STUDIO_API_KEY={LS_TOKEN}\nMLFLOW_TRACKING_URI={tracking}\n")  # fmt: skip
    env_file.chmod(0o644)
    db = f"airflow_{uuid.uuid4().hex[:8]}"
    _psql(f"CREATE DATABASE {db}")
    api_port = free_port()
    home = tmp / "airflow"
    home.mkdir()
    (home / "passwords.json").write_text(json.dumps({"operator": "op-e2e-pw"}))
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",  # two cores: publish and feedback side by side, no more
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "operator:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "HFI_CONFIG": f"s3://{bucket}/configs/production.yaml",
        # No timed runs: unpausing a cron DAG starts its latest tick at once (catchup=False), which
        # would race the nights below. The asset and the REST API start every run here.
        "HFI_REMOVAL_SCHEDULE": "none",
        "HFI_BATCH_SCHEDULE": "none",
        "HFI_RUN_ROOT": f"s3://{bucket}/runs",
        "HFI_STEP_RUNNER": "docker",
        "HFI_STEP_RETRIES": "0",  # a failure fails the test now, not after the retry delays
        "HFI_STEP_GPUS": "none",  # this machine has no GPU: no device requests
        "HFI_PULL_WAIT_MINUTES": "15",
        "HFI_PULL_POLL_SECONDS": "5",
        "HFI_IMAGE": step_image,
        "HFI_DOCKER_URL": dockerd,
        "HFI_DOCKER_NETWORK": "host",  # moto, MLflow and Label Studio listen on the host's 127.0.0.1
        "HFI_DOCKER_ENV_FILE": str(env_file),
        "MLFLOW_TRACKING_URI": tracking,
        "HFI_S3_ENDPOINT_URL": services["s3"],
        "HFI_EXPERIMENT": "hfi-nightly",
        "HFI_GIT_COMMIT": "test-commit",
        "HFI_IMAGE_TAG": step_image,
    }
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "LABEL_STUDIO_API_KEY"):
        env.pop(k, None)  # the Airflow processes hold no credentials: only the env file does
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    before = _listeners()
    seen: set[str] = set()
    inspected: dict[str, str] = {}  # `docker inspect` of every step container, caught while it runs
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            for cid in _docker(dockerd, "ps", "-q", timeout=30).stdout.split():
                if cid not in inspected:
                    inspected[cid] = _docker(dockerd, "inspect", cid, timeout=30).stdout
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    procs = [
        _start([str(BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1"], env,
               tmp / "api-server.log"),
        _start([str(BIN / "airflow"), "scheduler", "--skip-serve-logs"], env, tmp / "scheduler.log"),
        _start([str(BIN / "airflow"), "dag-processor"], env, tmp / "dag-processor.log"),
    ]  # fmt: skip
    try:
        _wait_http(f"http://127.0.0.1:{api_port}/api/v2/monitor/health", "api-server", procs[0],
                   tmp / "api-server.log", 180)  # fmt: skip
        api = Airflow(f"http://127.0.0.1:{api_port}", "operator", "op-e2e-pw")
        deadline = time.time() + 180
        while {d["dag_id"] for d in api.call("GET", "/dags")["dags"]} != {
            "hfi_concept_removal",
            "hfi_feedback_collection",
        }:
            assert time.time() < deadline, "the dag-processor did not parse both DAGs in 180 s"
            time.sleep(3)
        seen |= _listeners()

        # Night 1. The operator starts a labelling batch; annotators label part of it in Label Studio.
        batch = api.call("POST", "/dags/hfi_feedback_collection/dagRuns", {"logical_date": None,
                                                                          "dag_run_id": "batch-1"})  # fmt: skip
        from label_studio_sdk import LabelStudio

        ls = LabelStudio(base_url=labelstudio, api_key=LS_TOKEN)
        deadline = time.time() + 900
        while not [p for p in ls.projects.list() if p.title == "hfi striped" and (p.task_number or 0) >= 72]:
            assert time.time() < deadline, (
                f"publish did not fill the Label Studio project: {api.failures('hfi_feedback_collection', 'batch-1')}"
            )
            assert api.call("GET", "/dags/hfi_feedback_collection/dagRuns/batch-1")["state"] != "failed", api.failures(
                "hfi_feedback_collection", "batch-1"
            )
            time.sleep(5)
        seen |= _listeners()
        label = [str(BIN / "hfi"), "feedback", "simulate", "--config", str(config), "--run-uri",
                 f"s3://{bucket}/runs/{batch['dag_run_id']}", "--labelstudio"]  # fmt: skip
        hfi_env = {**os.environ, "LABEL_STUDIO_API_KEY": LS_TOKEN, "HFI_S3_ENDPOINT_URL": services["s3"]}
        first = json.loads(subprocess.run([*label, "--share", "0.6"], env=hfi_env, check=True, capture_output=True,
                                          text=True).stdout)  # fmt: skip
        collected = api.wait("hfi_feedback_collection", "batch-1", 900)
        assert collected["state"] == "success", api.failures("hfi_feedback_collection", "batch-1")
        # The pull's asset event starts the removal DAG: nobody triggers it.
        deadline = time.time() + 300
        while not [r for r in api.runs("hfi_concept_removal") if r["run_type"] == "asset_triggered"]:
            assert time.time() < deadline, "the asset event did not trigger hfi_concept_removal"
            time.sleep(3)
        night1 = [r for r in api.runs("hfi_concept_removal") if r["run_type"] == "asset_triggered"][0]
        while api.call("GET", f"/dags/hfi_concept_removal/dagRuns/{night1['dag_run_id']}")["state"] not in (
            "success",
            "failed",
        ):
            seen |= _listeners()
            time.sleep(5)
        night1 = api.wait("hfi_concept_removal", night1["dag_run_id"], 60)
        assert night1["state"] == "success", api.failures("hfi_concept_removal", night1["dag_run_id"])

        # Night 2: the annotators finish the batch; the operator triggers the removal through the API.
        second = json.loads(subprocess.run([*label, "--share", "1.0"], env=hfi_env, check=True, capture_output=True,
                                           text=True).stdout)  # fmt: skip
        night2 = api.call("POST", "/dags/hfi_concept_removal/dagRuns", {"logical_date": None,
                                                                        "dag_run_id": "manual__night-2"})  # fmt: skip
        deadline = time.time() + 1200
        while api.call("GET", "/dags/hfi_concept_removal/dagRuns/manual__night-2")["state"] not in (
            "success",
            "failed",
        ):
            assert time.time() < deadline, "night 2 did not end in 20 minutes"
            seen |= _listeners()
            time.sleep(5)
        night2 = api.wait("hfi_concept_removal", "manual__night-2", 60)
        assert night2["state"] == "success", api.failures("hfi_concept_removal", "manual__night-2")
        runs = api.runs("hfi_concept_removal")
        # What Airflow keeps of every task: its rendered templates and its XCom entries.
        kept = []
        for dag, run_id in (("hfi_feedback_collection", "batch-1"), ("hfi_concept_removal", night1["dag_run_id"]),
                            ("hfi_concept_removal", "manual__night-2")):  # fmt: skip
            base = f"/dags/{dag}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances"
            for ti in api.call("GET", base)["task_instances"]:
                kept.append(json.dumps(ti.get("rendered_fields")))
                entries = api.call("GET", f"{base}/{ti['task_id']}/xcomEntries")["xcom_entries"]
                kept += [json.dumps(api.call("GET", f"{base}/{ti['task_id']}/xcomEntries/{e['key']}"))
                         for e in entries]  # fmt: skip
    finally:
        watching.set()
        for proc in procs:
            _stop(proc)
        _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    logs = "\n".join(p.read_text(errors="replace") for p in home.rglob("*.log"))
    return {"tmp": tmp, "home": home, "bucket": bucket, "s3": s3, "mlflow": services["mlflow"], "first": first,
            "second": second, "nights": [night1["dag_run_id"], night2["dag_run_id"]], "runs": runs,
            "new_listeners": seen - before, "logs": logs, "config": config, "airflow_kept": "\n".join(kept),
            "inspected": inspected}  # fmt: skip


def _labels(nights, night: str) -> pd.DataFrame:
    import io

    body = nights["s3"].get_object(
        Bucket=nights["bucket"], Key=f"runs/{night.replace(':', '').replace('+', '')}/feedback/labels.parquet"
    )["Body"]
    return pd.read_parquet(io.BytesIO(body.read()))


def test_the_image_runs_as_a_non_root_user_with_the_hfi_entrypoint(dockerd, step_image):
    user = _docker(dockerd, "run", "--rm", "--entrypoint", "id", step_image, "-u")
    assert user.returncode == 0 and user.stdout.strip() == "10001", user.stdout + user.stderr
    helped = _docker(dockerd, "run", "--rm", step_image, "step", "--help")
    assert helped.returncode == 0 and "generate" in helped.stdout, helped.stdout + helped.stderr


def test_night_one_was_started_by_the_asset_event_and_night_two_by_the_rest_api(nights):
    by_id = {r["dag_run_id"]: r for r in nights["runs"]}
    assert by_id[nights["nights"][0]]["run_type"] == "asset_triggered"
    assert by_id[nights["nights"][1]]["run_type"] == "manual"
    assert all(r["state"] == "success" for r in nights["runs"] if r["dag_run_id"] in nights["nights"])


def test_each_night_trains_on_every_label_so_far_and_each_annotation_counts_once(nights):
    first, second = nights["first"], nights["second"]
    assert first["images"] == 43 and first["annotations"] == 43 * 3 and first["annotators"] == 3  # 60% of 72
    assert second["images"] == 29 and second["annotations"] == 29 * 3
    one, two = (_labels(nights, n) for n in nights["nights"])
    assert len(one) == 43 and (one.n_votes == 3).all()
    assert len(two) == 72 and (two.n_votes == 3).all() and (two.n_annotators == 3).all()  # the union, once each
    assert set(one.image_id) < set(two.image_id)


def test_one_finished_parent_per_night_with_headline_metrics_and_a_child_per_step(nights):
    client = MlflowClient(nights["mlflow"])
    exp = client.get_experiment_by_name("hfi-nightly")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parents = client.search_runs(
        [exp.experiment_id], "tags.`hfi.level` = 'parent' and tags.`airflow.dag_id` = 'hfi_concept_removal'"
    )
    assert len(parents) == 2
    for parent in parents:
        assert parent.info.status == "FINISHED", parent.info.run_name
        assert parent.info.run_name.startswith("striped · ")
        m = parent.data.metrics
        for key in ("labels_used", "reward_auc", "concept_rate", "preservation_drop", "promoted",
                    "target_explicit.concept_before", "target_explicit.concept_after"):  # fmt: skip
            assert key in m, (parent.info.run_name, key)
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert sorted(c.data.tags["hfi.stage"] for c in children) == sorted(STEPS)
        assert all(c.info.status == "FINISHED" for c in children)
        register = next(c for c in children if c.data.tags["hfi.stage"] == "register")
        assert "gates.concept_rate.value" in register.data.metrics
    labels = sorted(p.data.metrics["labels_used"] for p in parents)
    assert labels == [43 * 3, 72 * 3]


def test_the_champion_alias_is_where_the_gates_and_the_challenger_rule_put_it(nights):
    client = MlflowClient(nights["mlflow"])
    versions = sorted(client.search_model_versions("name = 'hfi-toyworld-striped'"), key=lambda v: int(v.version))
    assert len(versions) == 2
    v1, v2 = versions
    assert v1.tags["hfi.verdict"] == "promoted"  # the first night had no champion; its gates are open
    beats = float(v2.tags["hfi.concept_rate"]) < float(v1.tags["hfi.concept_rate"]) and float(
        v2.tags["hfi.preservation_drop"]) <= float(v1.tags["hfi.preservation_drop"])  # fmt: skip
    champion = client.get_model_version_by_alias("hfi-toyworld-striped", "champion")
    assert champion.version == (v2.version if beats else v1.version)
    assert v2.tags["hfi.verdict"] == ("promoted" if beats else "kept champion") and v2.tags["hfi.reason"]
    assert v2.tags["hfi.champion.version"] == str(v1.version)


def test_nothing_listened_beyond_127_0_0_1_and_no_credential_reached_airflow(nights, tmp_path):
    wide = sorted(a for a in nights["new_listeners"] if not a.startswith(("127.0.0.1:", "[::1]:")))
    assert wide == [], f"listeners beyond loopback during the run: {wide}"
    # The secret sits in the env file and in the tracking URI's user part; it is in none of:
    # Airflow's task logs, its rendered templates and XCom, the step containers' `docker inspect`,
    # nor MLflow's params, tags and artifacts.
    steps = [text for text in nights["inspected"].values() if "hfi-step" in text]
    assert len(steps) >= 8, f"caught {len(steps)} step containers with docker inspect"
    client = MlflowClient(nights["mlflow"])
    exp = client.get_experiment_by_name("hfi-nightly")
    recorded = []
    for run in client.search_runs([exp.experiment_id], max_results=500):
        recorded.append(json.dumps({"params": run.data.params, "tags": run.data.tags}))
        folder = tmp_path / run.info.run_id
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(folder), tracking_uri=nights["mlflow"])
        recorded += [p.read_bytes().decode(errors="replace") for p in folder.rglob("*") if p.is_file()]
    assert len(recorded) > 20
    for where, text in (("task logs", nights["logs"]), ("rendered templates and XCom", nights["airflow_kept"]),
                        ("docker inspect", "\n".join(steps)), ("MLflow", "\n".join(recorded))):  # fmt: skip
        assert SECRET not in text and LS_TOKEN not in text, f"a credential reached {where}"
    assert "MLFLOW_TRACKING_URI" in nights["airflow_kept"]  # the containers' rendered environment was read


def test_the_mlflow_ui_shows_both_nights_and_compares_their_headline_metrics(nights, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium (make test installs Debian's chromium)")
    import urllib.parse

    client = MlflowClient(nights["mlflow"])
    exp = client.get_experiment_by_name("hfi-nightly")
    parents = client.search_runs(
        [exp.experiment_id], "tags.`hfi.level` = 'parent' and tags.`airflow.dag_id` = 'hfi_concept_removal'"
    )
    names = [f"striped · {n.replace(':', '').replace('+', '')}" for n in nights["nights"]]
    shots = ROOT / "test-artifacts"  # kept after the run (git-ignored), for people to look at
    shots.mkdir(exist_ok=True)
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
              f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip

    def page(url: str, shot: Path, width: int = 1800) -> str:
        size = f"--window-size={width},1400"  # the table draws only the columns in its window
        subprocess.run([*common, size, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
        assert shot.exists() and shot.stat().st_size > 10_000
        return subprocess.run([*common, size, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                              check=True).stdout  # fmt: skip

    # The experiment opens on its runs table (not the GenAI overview).
    table = page(f"{nights['mlflow']}/#/experiments/{exp.experiment_id}/runs", shots / "mlflow-experiment.png")
    assert "Training runs" in table and all(name in table for name in names)
    # The link every night's parent carries: the runs table with one row per night and the
    # headline metrics as columns, from the view saved on the server (no click, no browser state).
    views = {p.data.tags["hfi.nights_view"] for p in parents}
    assert len(views) == 1
    table = page(f"{nights['mlflow']}/{views.pop()}", shots / "mlflow-runs.png", width=5200)
    assert all(name in table for name in names)
    for metric in headline_keys(load_config(nights["config"])):
        assert f">{metric}<" in table, f"no column {metric} in the runs table"
    # The nights side by side: MLflow's compare view of the two parents, headline metrics as rows.
    ids = urllib.parse.quote(json.dumps([p.info.run_id for p in parents]))
    compare = page(f"{nights['mlflow']}/#/compare-runs?runs={ids}&experiments=%5B%22{exp.experiment_id}%22%5D",
                   shots / "mlflow-compare.png")  # fmt: skip
    assert all(name in compare for name in names)
    for metric in ("labels_used", "reward_auc", "concept_rate", "preservation_drop", "promoted",
                   "target_explicit.concept_after"):  # fmt: skip
        assert metric in compare, metric
