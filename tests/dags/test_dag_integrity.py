"""DAG integrity: the files parse, with the expected tasks, edges, retries, timeouts and Params."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DAGS = Path(__file__).parents[2] / "dags"


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    os.environ["AIRFLOW_HOME"] = str(tmp_path_factory.mktemp("airflow"))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_every_dag_file_imports_without_errors(bag):
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"hfi_concept_removal", "hfi_feedback_collection"}


def test_the_dags_tasks_and_edges_are_the_stage_tables(bag):
    from hfi_core.stages import STAGES

    dag = bag.dags["hfi_concept_removal"]
    assert {t.task_id for t in dag.tasks} == set(STAGES)
    for name, st in STAGES.items():
        task = dag.get_task(name)
        assert task.upstream_task_ids == set(st.upstream), name
        assert task.execution_timeout.total_seconds() == st.timeout_hours * 3600, name
    batch = bag.dags["hfi_feedback_collection"]
    stages = [t for t in batch.tasks if t.task_id != "pull_feedback"]
    assert {t.task_id for t in stages} == {n for n, st in STAGES.items() if st.batch}
    for task in stages:
        assert task.upstream_task_ids == set(STAGES[task.task_id].upstream) & {t.task_id for t in batch.tasks}
    # The pull after publish is what records the asset event that triggers the removal DAG.
    pull = batch.get_task("pull_feedback")
    assert pull.upstream_task_ids == {"publish"}
    assert [a.name for a in pull.outlets] == ["hfi_feedback_batch"]
    assert "hfi" in dag.tags and dag.catchup is False and dag.max_active_runs == 1


def test_the_exported_stage_table_and_params_are_current():
    from tasks.dags import params_json, stages_json

    assert (DAGS / "hfi_stages.json").read_text() == stages_json(), "run `hfi dags export`"
    assert (DAGS / "hfi_params.json").read_text() == params_json(), "run `hfi dags export`"


def test_every_task_retries_with_backoff_has_a_timeout_and_a_failure_callback(bag):
    for dag_id in bag.dag_ids:
        for task in bag.dags[dag_id].tasks:
            assert task.retries >= 2 and task.retry_exponential_backoff, task.task_id
            assert task.execution_timeout is not None and task.on_failure_callback, task.task_id


def test_the_schedule_is_nightly_or_a_new_feedback_batch(bag):
    schedule = bag.dags["hfi_concept_removal"].timetable
    assert "0 2 * * *" in repr(schedule) and "hfi_feedback_batch" in repr(schedule)


def test_params_are_the_config_schema_with_its_types_enums_and_ranges(bag):
    from tasks.dags import params_json

    params = bag.dags["hfi_concept_removal"].params
    fields = json.loads(params_json())
    assert {f["key"] for f in fields} | {"config", "run_root", "run_name"} == set(params.keys())
    assert params["distill.lr"] is None  # unset Params keep the YAML's value
    lr = params.get_param("distill.lr")
    assert "AdamW learning rate" in lr.description and lr.schema["exclusiveMinimum"] == 0
    assert params.get_param("distill.method").schema["enum"] == ["sdd", "esd", "uce", None]
    assert params.get_param("distill.steps").schema["minimum"] == 1


def _rendered_argv(bag, stage: str, conf: dict) -> list[str]:
    """The task's argv as Airflow renders it for a run with ``conf``."""
    dag = bag.dags["hfi_concept_removal"]
    task = dag.get_task(stage)
    params = {k: None for k in dag.params.keys()} | {"config": "c.yaml", "run_root": "/r", "run_name": None} | conf
    context = {"params": params, "run_id": "scheduled__2026-11-28T02:00:00+00:00", "dag": dag, "task": task}
    return task.render_template(task.op_args, context)


def test_a_step_is_one_argv_with_the_set_params_and_nothing_spliced_into_a_shell(bag):
    argv = _rendered_argv(bag, "distill", {"distill.lr": 0.0002, "distill.method": "esd", "run_name": '$(id)"; id'})
    assert argv[:5] == ["hfi", "step", "distill", "--config", "c.yaml"]
    assert argv[5:7] == ["--run-uri", '/r/$(id)"; id']  # one argument, never read by a shell
    assert argv[7] == "--params-json"
    overrides = {k: v for k, v in json.loads(argv[8]).items() if v is not None}
    assert overrides == {"distill.lr": 0.0002, "distill.method": "esd"}
    assert len(argv) == 9
    assert _rendered_argv(bag, "distill", {})[6] == "/r/scheduled__2026-11-28T0200000000"


def test_a_param_of_1e_5_arrives_as_the_float_1e_05_in_the_steps_config(bag, tmp_path):
    from tasks.cli import build_parser
    from tasks.common import load_run_config
    from tasks.step import params_overrides

    config = tmp_path / "c.yaml"
    config.write_text((DAGS.parent / "configs" / "toyworld-striped.yaml").read_text())
    argv = _rendered_argv(bag, "distill", {"config": str(config), "distill.lr": 1e-5, "reward.weight_decay": 2e-05})
    args = build_parser().parse_args(argv[1:])  # what `hfi step` parses
    cfg = load_run_config(args.config, args.set, params_overrides(args.params_json))
    assert type(cfg.distill.lr) is float and cfg.distill.lr == 1e-05
    assert cfg.reward.weight_decay == 2e-05 and repr(cfg.reward.weight_decay) == "2e-05"


def test_dags_test_with_an_out_of_range_param_is_refused_before_any_task_runs(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": "0"}  # fmt: skip
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    runs = tmp_path / "runs"
    for bad, why in (({"distill.lr": -1}, "distill.lr"), ({"distill.method": "xyz"}, "distill.method")):
        conf = {"config": str(DAGS.parent / "configs" / "toyworld-striped.yaml"), "run_root": str(runs), **bad}
        result = subprocess.run([str(airflow), "dags", "test", "hfi_concept_removal", "--conf", json.dumps(conf)],
                                env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        out = result.stdout + result.stderr
        assert result.returncode != 0 and f"Invalid input for param {why}" in out, out[-3000:]
        assert not runs.exists()  # no step started: nothing was written


def test_dag_files_import_nothing_heavy_at_parse_time():
    code = (
        "import sys, runpy; sys.path.insert(0, sys.argv[1]);"
        "[runpy.run_path(f'{sys.argv[1]}/{f}') for f in ('hfi_concept_removal.py', 'hfi_feedback_collection.py')];"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'mlflow', 'boto3', 'hfi_core') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    env = {**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    result = subprocess.run([sys.executable, "-c", code, str(DAGS)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_ruff_airflow_rules_are_clean():
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "--select", "AIR", str(DAGS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _operators(runner: str, gpus: str, env_file: str | None = None) -> dict:
    """Build the removal DAG's operators in a fresh interpreter with HFI_STEP_RUNNER=runner and
    report, per task, the class and its GPU settings."""
    code = """
import json, sys
sys.path.insert(0, sys.argv[1])
import hfi_steps
out = {}
for stage in hfi_steps.STAGES:
    op = hfi_steps.step_task(stage)
    from airflow.providers.docker.operators.docker import DockerOperator
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    info = {"class": next((c.__name__ for c in (DockerOperator, KubernetesPodOperator) if isinstance(op, c)),
                          type(op).__name__)}
    if info["class"] == "DockerOperator":
        info["gpu"] = [r.count for r in (op.device_requests or [])]
        info["entrypoint"], info["command"] = op.entrypoint, op.command
        info["mounts"] = [m["Target"] for m in op.mounts]
    if info["class"] == "KubernetesPodOperator":
        res = op.container_resources
        info["gpu"] = (res.limits or {}).get("nvidia.com/gpu") if res else None
        info["tolerations"] = len(op.tolerations or [])
        info["node_selector"] = op.node_selector or {}
        info["cmds"], info["arguments"] = op.cmds, op.arguments
    out[stage] = info
print(json.dumps(out))
"""
    env = {**os.environ, "HFI_STEP_RUNNER": runner, "HFI_STEP_GPUS": gpus}
    env.pop("HFI_DOCKER_ENV_FILE", None)
    if env_file:
        env["HFI_DOCKER_ENV_FILE"] = env_file
    result = subprocess.run([sys.executable, "-c", code, str(DAGS)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_one_setting_switches_steps_to_docker_or_kubernetes_with_gpus_only_where_asked():
    local = _operators("local", "all")
    assert {v["class"] for v in local.values()} == {"PythonOperator"}

    docker = _operators("docker", "all")
    assert {v["class"] for v in docker.values()} == {"DockerOperator"}
    assert docker["distill"]["gpu"] == [-1] and docker["generate"]["gpu"] == [-1]
    assert docker["publish"]["gpu"] == [] and docker["register"]["gpu"] == []
    assert docker["distill"]["entrypoint"] is None  # the image's own: hfi, no shell
    assert docker["distill"]["command"][:2] == ["step", "distill"] and "--env-file" not in docker["distill"]["command"]
    secret = _operators("docker", "all", env_file="/etc/hfi/creds")["distill"]
    assert secret["command"][-2:] == ["--env-file", "/run/secrets/hfi-env"] and secret["entrypoint"] is None
    assert secret["mounts"] == ["/run/secrets/hfi-env"]
    assert _operators("docker", "none")["distill"]["gpu"] == []
    two = _operators("docker", "2")
    assert two["distill"]["gpu"] == [2] and two["generate"]["gpu"] == [2]
    # distill trains data-parallel, one process per GPU; the other stages stay one process
    assert two["distill"]["entrypoint"] == ["torchrun"]
    assert two["distill"]["command"][:6] == ["--standalone", "--nproc_per_node", "2", "--no-python", "hfi", "step"]
    assert two["generate"]["entrypoint"] is None and two["generate"]["command"][:2] == ["step", "generate"]

    pods = _operators("kubernetes", "all")
    assert {v["class"] for v in pods.values()} == {"KubernetesPodOperator"}
    assert pods["distill"]["gpu"] == "1" and pods["distill"]["tolerations"] == 1
    assert pods["distill"]["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert pods["reward"]["gpu"] is None and pods["reward"]["tolerations"] == 0
    four = _operators("kubernetes", "4")["distill"]
    assert four["gpu"] == "4" and four["cmds"] == ["torchrun"] and four["arguments"][2:5] == ["4", "--no-python", "hfi"]


def test_bad_input_fails_the_task_at_once_and_other_failures_are_retried():
    """``hfi`` exits 2 for bad input: the local runner and the Docker operator raise Airflow's
    fail-without-retry exception for it, and an ordinary error for anything else."""
    code = """
import sys
sys.path.insert(0, sys.argv[1])
import hfi_steps
from airflow.exceptions import AirflowFailException
from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator

def outcome(fn):
    try:
        fn()
    except AirflowFailException:
        return "fail-at-once"
    except Exception as e:
        return type(e).__name__
    return "ok"

py = sys.executable
print("RESULT", outcome(lambda: hfi_steps.run_argv(py, "-c", "import sys; sys.exit(2)")))
print("RESULT", outcome(lambda: hfi_steps.run_argv(py, "-c", "import sys; sys.exit(1)")))
op = hfi_steps.step_task("reward")
for code in (2, 1, 23):
    def boom(self, context, code=code):
        raise DockerContainerFailedException(f"Docker container failed: {{'StatusCode': {code}, 'Error': None}}")
    DockerOperator.execute = boom
    print("RESULT", outcome(lambda: op.execute({})))
"""
    env = {**os.environ, "HFI_STEP_RUNNER": "docker"}
    result = subprocess.run([sys.executable, "-c", code, str(DAGS)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    got = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    pods = """
import sys
sys.path.insert(0, sys.argv[1])
import hfi_steps
from airflow.exceptions import AirflowException, AirflowFailException
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

op = hfi_steps.step_task("reward")
def failed(self, pod, remote_pod, *a, **k):
    raise AirflowException("Pod hfi-reward returned a failure.")
KubernetesPodOperator.cleanup = failed
for code in (2, 1):
    state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=code))
    status = k8s.V1ContainerStatus(name="base", state=state, image="i", image_id="i", ready=False, restart_count=0)
    pod = k8s.V1Pod(status=k8s.V1PodStatus(container_statuses=[status]))
    try:
        op.cleanup(pod, pod)
        print("RESULT ok")
    except AirflowFailException:
        print("RESULT fail-at-once")
    except AirflowException:
        print("RESULT AirflowException")
print("RESULT", op.skip_on_exit_code)
"""
    env = {**os.environ, "HFI_STEP_RUNNER": "kubernetes"}
    result = subprocess.run([sys.executable, "-c", pods, str(DAGS)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    got += [line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert got == ["fail-at-once", "RuntimeError", "fail-at-once", "DockerContainerFailedException",
                                     "DockerContainerFailedException", "fail-at-once", "AirflowException",
                                     "[99]"]  # fmt: skip


def test_a_credential_in_a_passed_through_uri_never_reaches_a_containers_environment():
    code = """
import json, sys
sys.path.insert(0, sys.argv[1])
import hfi_steps
op = hfi_steps.step_task("reward")
print("RESULT", json.dumps(op.environment))
print("RESULT", json.dumps([hfi_steps.without_credentials(v) for v in
      ("http://u:p%40ss@mlflow:5000/x", "https://tok@h/", "http://h:1", "databricks", "file:///a/b")]))
"""
    env = {**os.environ, "HFI_STEP_RUNNER": "docker", "MLFLOW_TRACKING_URI": "http://hfi:s3cr3t-9f@127.0.0.1:5000"}
    result = subprocess.run([sys.executable, "-c", code, str(DAGS)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    environment, cases = (json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
                          if line.startswith("RESULT "))  # fmt: skip
    assert environment["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000" and "s3cr3t" not in json.dumps(environment)
    assert cases == ["http://mlflow:5000/x", "https://h/", "http://h:1", "databricks", "file:///a/b"]


def test_shell_payloads_in_params_reach_the_local_step_as_literal_strings(tmp_path):
    """Run for real with the local runner: `dags test` renders the payloads into the step's argv,
    the step runs and refuses the config path, quoting it: every payload arrived as plain text
    and none ran (no file appears)."""
    import shutil
    import tempfile

    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": "0",
           "HFI_STEP_RUNNER": "local", "HFI_BIN": str(Path(sys.executable).with_name("hfi")),
           "HFI_STEP_RETRIES": "0"}  # fmt: skip
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    marks = Path(tempfile.mkdtemp(prefix="p", dir="/tmp"))  # short: the error line quotes the payloads
    payloads = [f"$(touch {marks}/d)", f"`touch {marks}/b`", f'c"; touch {marks}/q; "']
    conf = {"config": "/nonexistent/" + "/".join(payloads) + ".yaml", "run_root": str(tmp_path / "runs"),
            "run_name": payloads[0] + payloads[1]}  # fmt: skip
    try:
        result = subprocess.run([str(airflow), "dags", "test", "hfi_concept_removal", "--conf", json.dumps(conf)],
                                env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        out = (result.stdout + result.stderr).replace('\\"', '"')
        assert not list(marks.iterdir()), f"a payload ran as shell code: {list(marks.iterdir())}"
        assert "cannot read YAML" in out and all(p in out for p in payloads), out[-3000:]
        assert "bad input (exit 2" in out  # failed at once, not retried
    finally:
        shutil.rmtree(marks, ignore_errors=True)
