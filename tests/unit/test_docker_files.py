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
