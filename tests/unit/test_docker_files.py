"""The step images and the local stack: lint-clean, localhost-only, no secrets in the files."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

DOCKER = Path(__file__).parents[2] / "docker"


def test_dockerfiles_are_hadolint_clean_at_warning_level():
    hadolint = Path(sys.executable).with_name("hadolint")
    files = [str(DOCKER / "Dockerfile"), str(DOCKER / "Dockerfile.cpu")]
    result = subprocess.run([str(hadolint), "--failure-threshold", "warning", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_step_images_run_as_a_non_root_user_with_hfi_as_entrypoint_and_a_base_image_argument():
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (DOCKER / name).read_text()
        assert re.search(r"^ARG BASE_IMAGE=", text, re.M) and "FROM ${BASE_IMAGE}" in text
        assert re.search(r"^USER 10001$", text, re.M) and 'ENTRYPOINT ["hfi"]' in text


def test_the_local_stack_binds_to_localhost_and_writes_no_secret():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert {"postgres", "minio", "mlflow", "labelstudio", "airflow"} <= set(compose["services"])
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    text = (DOCKER / "compose.yaml").read_text()
    for key in ("PASSWORD", "SECRET_ACCESS_KEY"):
        for line in text.splitlines():
            if key in line and ":" in line and "${" not in line and "$$" not in line:
                raise AssertionError(f"literal secret in compose.yaml: {line.strip()}")


def test_the_local_stack_has_no_docker_socket_in_airflow_no_secret_in_argv_pinned_images_and_app_credentials():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    airflow = services["airflow"]
    assert not any("docker.sock" in v for v in airflow.get("volumes", [])), "Airflow holds the Docker socket"
    assert airflow["environment"]["HFI_DOCKER_URL"] == "tcp://docker-proxy:2375"
    proxy = services["docker-proxy"]
    assert proxy["volumes"] == ["/var/run/docker.sock:/var/run/docker.sock:ro"] and "ports" not in proxy
    assert proxy["environment"]["EXEC"] == "0"
    for name, service in services.items():
        image = service["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest" and (re.search(r"\d", tag) or image.startswith("hfi-step:")), (name, image)
        # A value interpolated by compose into a command is in `docker inspect` and in `ps`.
        parts = [service.get("command"), service.get("entrypoint"), (service.get("healthcheck") or {}).get("test")]
        argv = " ".join(" ".join(p) if isinstance(p, list) else str(p or "") for p in parts)
        for secret in ("PASSWORD", "SECRET", "API_KEY", "TOKEN"):
            assert not re.search(r"\$\{[A-Z_]*" + secret, argv), (name, argv)
    app = compose["x-env"]
    assert app["AWS_ACCESS_KEY_ID"] == "${HFI_S3_ACCESS_KEY}" and "MINIO_ROOT" not in str(app)
    assert "MINIO_ROOT" not in str(services["mlflow"]["environment"]) and "MINIO_ROOT" not in str(airflow)
    example = (DOCKER / "env.example").read_text()
    assert "HFI_S3_ACCESS_KEY=" in example and "HFI_S3_SECRET_KEY=" in example
