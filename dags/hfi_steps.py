"""How the hfi DAGs run a step: in-process, in Docker, or in a Kubernetes pod.

One setting, the worker's ``HFI_STEP_RUNNER`` environment variable (``local`` | ``docker`` |
``kubernetes``), chooses; no DAG file changes. ``HFI_STEP_GPUS`` (``all``, a count, or ``none``)
says what the GPU steps ask for. Every step runs the same argv,
``hfi step <stage> --config C --run-uri URI --params-json {...}``, as a subprocess of the worker
(local), in the step image (Docker, with GPU device requests) or in a pod (``nvidia.com/gpu``
limits, node selector, tolerations). The command is an argv list: Params are rendered into
single arguments, never into a shell string.

The pipeline's shape comes from ``hfi_stages.json`` and the Params from ``hfi_params.json``, both
exported from the library (``hfi dags export``), so parsing a DAG imports nothing heavy: not
torch, diffusers, mlflow, boto3, nor ``hfi_core``. The provider modules are imported only for
the runner in use. Credentials never appear here: local steps inherit the worker's environment;
Docker steps read an env file of the worker host (``HFI_DOCKER_ENV_FILE``, a path, mounted
read-only and passed as ``hfi step --env-file``; it must be readable by the image's user, uid
10001); pods mount a Kubernetes Secret (``HFI_K8S_SECRET``, a name).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import re
import subprocess
from pathlib import Path

from airflow.sdk import Asset

RUNNER = os.environ.get("HFI_STEP_RUNNER", "local")
IMAGE = os.environ.get("HFI_IMAGE", "hfi-step:latest")
HFI_BIN = os.environ.get("HFI_BIN", "hfi")
# GPUs a GPU step asks for: "all", a count, or "none" (CPU-only hosts and clusters).
GPUS = os.environ.get("HFI_STEP_GPUS", "all")
PARAMS_FILE = Path(__file__).with_name("hfi_params.json")
STAGES_FILE = Path(__file__).with_name("hfi_stages.json")
STAGES: dict[str, dict] = {s["name"]: s for s in json.loads(STAGES_FILE.read_text())}
"""The stage table: name -> {upstream, gpu, timeout_hours, progress, batch}."""
SECRET_ENV = "/run/secrets/hfi-env"  # where a Docker step finds HFI_DOCKER_ENV_FILE (no ".env": see below)
# What the step reads about its Airflow run, passed explicitly to containers and pods.
CONTEXT_ENV = {
    "AIRFLOW_CTX_DAG_ID": "{{ dag.dag_id }}",
    "AIRFLOW_CTX_DAG_RUN_ID": "{{ run_id }}",
    "AIRFLOW_CTX_TASK_ID": "{{ task.task_id }}",
    "AIRFLOW_CTX_TRY_NUMBER": "{{ ti.try_number }}",
}
PASS_THROUGH = ("MLFLOW_TRACKING_URI", "HFI_S3_ENDPOINT_URL", "HFI_IMAGE_TAG", "HFI_GIT_COMMIT", "HFI_EXPERIMENT")

log = logging.getLogger(__name__)


FEEDBACK_BATCH = Asset("hfi_feedback_batch", uri="file:///hfi/feedback/inbox")
"""New labels in a concept's inbox: ``pull_feedback`` records it, and it triggers the removal DAG."""


def without_credentials(value: str) -> str:
    """``value`` with the user part of a URI dropped (``http://u:p@host`` -> ``http://host``).

    A container's or pod's environment is a templated field: Airflow stores it rendered, shows it
    in its UI, and Docker shows it in ``docker inspect``. A tracking URI with credentials in it
    reaches the step through the env file (``HFI_DOCKER_ENV_FILE``) or the Secret instead."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value
    netloc, slash, path = rest.partition("/")
    return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path}"


def notify_failure(context: dict) -> None:
    """on_failure_callback: one line naming the DAG run, task, try and where its log is."""
    ti = context.get("task_instance") or context.get("ti")
    log.error(
        "hfi step failed: dag=%s run=%s task=%s try=%s log=%s",
        getattr(ti, "dag_id", "?"),
        getattr(ti, "run_id", "?"),
        getattr(ti, "task_id", "?"),
        getattr(ti, "try_number", "?"),
        getattr(ti, "log_url", "?"),
    )


def default_args() -> dict:
    return {
        "owner": "ml-platform",
        "retries": int(os.environ.get("HFI_STEP_RETRIES", "2")),
        "retry_delay": dt.timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=30),
        "on_failure_callback": notify_failure,
    }


def params() -> dict:
    """Airflow Params: the config path, the run root, and every overridable config field.

    The fields and their JSON schemas (type, enum, minimum, maximum) come from ``hfi_params.json``,
    so Airflow's trigger form and ``dags test`` refuse a bad value before any step runs. ``None``
    (the default) keeps the YAML's value; the schema's own default is shown for reference.
    """
    from airflow.sdk import Param

    out = {
        # A scheduled or asset-triggered run has no conf: it takes the deployment's production
        # config (HFI_CONFIG on the scheduler and workers, else the Airflow Variable hfi_config,
        # read when the step's command is rendered). With neither, the step fails saying so.
        "config": Param(
            os.environ.get("HFI_CONFIG") or None,
            type=["string", "null"],
            description="run config YAML: an absolute path or an s3:// URI (default: $HFI_CONFIG, "
            "else the Airflow Variable hfi_config)",
        ),
        "run_root": Param(os.environ.get("HFI_RUN_ROOT", "/tmp/hfi-runs"), type="string", description="run store root"),
        "run_name": Param(None, type=["string", "null"], description="run folder under run_root (default: the run id)"),
    }
    for f in json.loads(PARAMS_FILE.read_text()):
        schema = dict(f["schema"])
        schema["type"] = [schema["type"], "null"]
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
        out[f["key"]] = Param(None, description=f"{f['doc']} (schema default: {f['default']})", **schema)
    return out


def step_argv(stage: str) -> list[str]:
    """The templated argv of ``hfi step``; each element renders to exactly one argument.

    The overridable Params travel as one JSON object (``tojson`` of each value, so 1e-05 stays a
    float and a string stays a string); the step drops the nulls.
    """
    keys = [f["key"] for f in json.loads(PARAMS_FILE.read_text())]
    run_uri = "{{ params.run_root }}/{{ params.run_name or (run_id | replace(':', '') | replace('+', '')) }}"
    overrides = "{" + ", ".join(f"{json.dumps(k)}: {{{{ params[{json.dumps(k)}] | tojson }}}}" for k in keys) + "}"
    config = "{{ params.config or var.value.get('hfi_config', '') }}"
    return [HFI_BIN, "step", stage, "--config", config, "--run-uri", run_uri,
            "--params-json", overrides]  # fmt: skip


def run_argv(*argv: str) -> None:
    """The local runner: run ``argv`` as a subprocess of the worker, its output in the task log."""
    log.info("running %s", json.dumps(list(argv[:3])))
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        log.info("%s", line.rstrip())
    if proc.wait() == NOTHING_NEW:
        from airflow.exceptions import AirflowSkipException

        raise AirflowSkipException("no new annotations")
    if proc.returncode == BAD_INPUT:
        from airflow.exceptions import AirflowFailException

        raise AirflowFailException(f"{' '.join(argv[1:3])}: bad input (exit 2, the line above): not retried")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:3])} exited with {proc.returncode}")


def step_task(stage: str):
    """The operator running ``stage`` with the runner chosen by ``HFI_STEP_RUNNER``."""
    row = STAGES[stage]
    argv = step_argv(stage)
    if row.get("parallel") and row["gpu"] and RUNNER != "local" and GPUS.isdigit() and int(GPUS) > 1:
        argv = data_parallel(argv, int(GPUS))
    return command_task(stage, argv, gpu=row["gpu"], timeout_hours=row["timeout_hours"])


def data_parallel(argv: list[str], processes: int) -> list[str]:
    """``argv`` as one process per GPU, for a stage that trains data-parallel (distill): torchrun,
    which is what ``accelerate launch --multi_gpu`` runs, starting the ``hfi`` binary itself."""
    return ["torchrun", "--standalone", "--nproc_per_node", str(processes), "--no-python", *argv]


def pull_argv() -> list[str]:
    """``hfi feedback pull``: the Label Studio project's export into the concept's inbox."""
    return [HFI_BIN, "feedback", "pull", *step_argv("feedback")[3:],
            "--wait-minutes", os.environ.get("HFI_PULL_WAIT_MINUTES", "720"),
            "--poll-seconds", os.environ.get("HFI_PULL_POLL_SECONDS", "60")]  # fmt: skip


NOTHING_NEW = 99
"""Exit code of ``hfi feedback pull`` when no new annotation came in: the task is skipped, and
a skipped task records no asset event."""
BAD_INPUT = 2
"""Exit code of ``hfi`` for bad input (a config, a Param, an export): the task fails at once,
since a retry would read the same input again."""


@functools.cache
def _docker_operator():
    """DockerOperator whose container exiting with ``BAD_INPUT`` fails the task without retries
    (made on first use: the provider is imported only by the runner that needs it)."""
    from airflow.exceptions import AirflowFailException
    from airflow.providers.docker.exceptions import DockerContainerFailedException
    from airflow.providers.docker.operators.docker import DockerOperator

    class StepDockerOperator(DockerOperator):
        def execute(self, context):
            try:
                return super().execute(context)
            except DockerContainerFailedException as e:
                if re.search(rf"'StatusCode': {BAD_INPUT}\b", str(e)):
                    raise AirflowFailException(f"{self.task_id}: bad input (exit 2): not retried") from e
                raise

    return StepDockerOperator


@functools.cache
def _pod_operator():
    """KubernetesPodOperator whose step container exiting with ``BAD_INPUT`` fails the task
    without retries (made on first use, like ``_docker_operator``)."""
    from airflow.exceptions import AirflowException, AirflowFailException, AirflowSkipException
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    class StepPodOperator(KubernetesPodOperator):
        def cleanup(self, pod, remote_pod, *args, **kwargs):
            try:
                return super().cleanup(pod, remote_pod, *args, **kwargs)
            except (AirflowSkipException, AirflowFailException):
                raise
            except AirflowException as e:
                status = remote_pod.status if remote_pod else None
                statuses = (status.container_statuses if status else None) or []
                step = next((c for c in statuses if c.name == self.base_container_name), None)
                ended = step.state.terminated if step and step.state else None
                if ended is not None and ended.exit_code == BAD_INPUT:
                    raise AirflowFailException(f"{self.task_id}: bad input (exit 2): not retried") from e
                raise

    return StepPodOperator


def command_task(task_id: str, argv: list[str], *, gpu: bool, timeout_hours: float, **extra):
    """An operator running ``argv`` (an ``hfi`` command) with the runner chosen by ``HFI_STEP_RUNNER``."""
    common = dict(task_id=task_id, execution_timeout=dt.timedelta(hours=timeout_hours), **extra)
    if RUNNER == "local":
        from airflow.providers.standard.operators.python import PythonOperator

        return PythonOperator(python_callable=run_argv, op_args=argv, **common)
    env = {**CONTEXT_ENV, **{k: without_credentials(os.environ[k]) for k in PASS_THROUGH if k in os.environ}}
    gpu = gpu and GPUS != "none"
    count = -1 if GPUS in ("all", "none") else int(GPUS)
    if RUNNER == "docker":
        from docker.types import DeviceRequest, Mount

        # The env file is mounted read-only and read by the step itself (``hfi step --env-file``),
        # so credentials go from the worker host's file to the step's environment and never
        # through Airflow (rendered templates, XCom, logs), and no shell ever runs: the image's
        # entrypoint is ``hfi``, the command the step's argv.
        env_file, mounts, command = os.environ.get("HFI_DOCKER_ENV_FILE"), [], argv[1:]
        entrypoint = None if argv[0] == HFI_BIN else argv[:1]  # the image's own (hfi), or the launcher
        if env_file:
            # ``mounts`` is a templated field and DockerOperator reads any string ending in ".env"
            # as a template file to load; a Jinja string literal renders to the path itself.
            source = "{{ " + json.dumps(env_file) + " }}"
            mounts = [Mount(target=SECRET_ENV, source=source, type="bind", read_only=True)]
            command = [*command, "--env-file", SECRET_ENV]
        return _docker_operator()(
            image=IMAGE,
            entrypoint=entrypoint,
            command=command,
            environment=env,
            mounts=mounts,
            docker_url=os.environ.get("HFI_DOCKER_URL", "unix://var/run/docker.sock"),
            network_mode=os.environ.get("HFI_DOCKER_NETWORK", "bridge"),
            mount_tmp_dir=False,
            auto_remove="success",
            skip_on_exit_code=NOTHING_NEW,
            device_requests=[DeviceRequest(count=count, capabilities=[["gpu"]])] if gpu else None,
            **common,
        )
    if RUNNER == "kubernetes":
        from kubernetes.client import models as k8s

        secret = os.environ.get("HFI_K8S_SECRET")
        gpu_limit = str(max(count, 1))  # a pod asks for whole GPUs; "all" means one
        return _pod_operator()(
            name=f"hfi-{task_id}",
            namespace=os.environ.get("HFI_K8S_NAMESPACE", "hfi"),
            image=IMAGE,
            cmds=argv[:1],
            arguments=argv[1:],
            env_vars=env,
            env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret))] if secret else None,
            container_resources=k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": gpu_limit}) if gpu else None,
            node_selector={"nvidia.com/gpu.present": "true"} if gpu else None,
            tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
            if gpu
            else None,
            get_logs=True,
            on_finish_action="delete_succeeded_pod",
            skip_on_exit_code=NOTHING_NEW,
            **common,
        )
    raise ValueError(f"HFI_STEP_RUNNER={RUNNER!r}: expected local, docker or kubernetes")


def add_stages(names: list[str]) -> dict:
    """One task per stage of ``names`` (in the current DAG), wired by the table's dependencies."""
    tasks = {name: step_task(name) for name in names}
    for name, task in tasks.items():
        for dep in STAGES[name]["upstream"]:
            if dep in tasks:
                tasks[dep] >> task
    return tasks
