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


def test_the_removal_dag_chains_every_step_in_order(bag):
    dag = bag.dags["hfi_concept_removal"]
    order = ["generate", "publish", "feedback", "reward", "invert", "distill", "evaluate", "register"]
    assert [t.task_id for t in dag.topological_sort()] == order
    for a, b in zip(order, order[1:], strict=False):
        assert dag.get_task(b).upstream_task_ids == {a}
    assert "hfi" in dag.tags and dag.catchup is False and dag.max_active_runs == 1


def test_every_task_retries_with_backoff_has_a_timeout_and_a_failure_callback(bag):
    for dag_id in bag.dag_ids:
        for task in bag.dags[dag_id].tasks:
            assert task.retries >= 2 and task.retry_exponential_backoff, task.task_id
            assert task.execution_timeout is not None and task.on_failure_callback, task.task_id


def test_the_schedule_is_nightly_or_a_new_feedback_batch(bag):
    schedule = bag.dags["hfi_concept_removal"].timetable
    assert "0 2 * * *" in repr(schedule) and "hfi_feedback_batch" in repr(schedule)


def test_params_are_the_config_schema_and_the_committed_file_is_current(bag):
    from tasks.dags import params_json

    assert (DAGS / "hfi_params.json").read_text() == params_json(), "run `hfi dags params`"
    params = bag.dags["hfi_concept_removal"].params
    fields = json.loads(params_json())
    assert {f["key"] for f in fields} | {"config", "run_root", "run_name"} == set(params.keys())
    assert params["distill.lr"] is None  # unset Params keep the YAML's value
    assert "AdamW learning rate" in params.get_param("distill.lr").description


def test_a_step_command_passes_only_the_params_that_are_set(bag):
    from jinja2 import Environment

    task = bag.dags["hfi_concept_removal"].get_task("distill")
    params = {k: None for k in bag.dags["hfi_concept_removal"].params.keys()}
    params |= {"config": "c.yaml", "run_root": "s3://b/runs", "distill.lr": 0.0002, "distill.method": "esd"}
    cmd = (
        Environment()
        .from_string(task.bash_command)
        .render(params=params, run_id="scheduled__2026-11-28T02:00:00+00:00")
    )
    assert cmd == (
        'hfi step distill --config "c.yaml" --run-uri "s3://b/runs/scheduled__2026-11-28T0200000000"'
        " '--set=distill.method=\"esd\"' '--set=distill.lr=0.0002'"
    )


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


def _operators(runner: str, gpus: str) -> dict:
    """Build the removal DAG's operators in a fresh interpreter with HFI_STEP_RUNNER=runner and
    report, per task, the class and its GPU settings."""
    code = """
import json, sys
sys.path.insert(0, sys.argv[1])
import hfi_steps
out = {}
for stage in hfi_steps.STAGES:
    op = hfi_steps.step_task(stage)
    info = {"class": type(op).__name__}
    if info["class"] == "DockerOperator":
        info["gpu"] = [r.count for r in (op.device_requests or [])]
    if info["class"] == "KubernetesPodOperator":
        res = op.container_resources
        info["gpu"] = (res.limits or {}).get("nvidia.com/gpu") if res else None
        info["tolerations"] = len(op.tolerations or [])
        info["node_selector"] = op.node_selector or {}
    out[stage] = info
print(json.dumps(out))
"""
    env = {**os.environ, "HFI_STEP_RUNNER": runner, "HFI_STEP_GPUS": gpus}
    result = subprocess.run([sys.executable, "-c", code, str(DAGS)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_one_setting_switches_steps_to_docker_or_kubernetes_with_gpus_only_where_asked():
    local = _operators("local", "all")
    assert {v["class"] for v in local.values()} == {"BashOperator"}

    docker = _operators("docker", "all")
    assert {v["class"] for v in docker.values()} == {"DockerOperator"}
    assert docker["distill"]["gpu"] == [-1] and docker["generate"]["gpu"] == [-1]
    assert docker["publish"]["gpu"] == [] and docker["register"]["gpu"] == []
    assert _operators("docker", "none")["distill"]["gpu"] == []
    assert _operators("docker", "2")["distill"]["gpu"] == [2]

    pods = _operators("kubernetes", "all")
    assert {v["class"] for v in pods.values()} == {"KubernetesPodOperator"}
    assert pods["distill"]["gpu"] == "1" and pods["distill"]["tolerations"] == 1
    assert pods["distill"]["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert pods["reward"]["gpu"] is None and pods["reward"]["tolerations"] == 0
