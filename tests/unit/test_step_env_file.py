"""`hfi step --env-file`: credentials reach the step's environment without a shell reading them."""

import os

import pytest

from tasks.step import read_env_file


def test_env_file_lines_become_variables_and_nothing_in_them_is_evaluated(tmp_path):
    f = tmp_path / "hfi-env"
    f.write_text(
        "# credentials\n\nAWS_ACCESS_KEY_ID=AKIA1\nexport AWS_SECRET_ACCESS_KEY='a b=c'\n"
        'MLFLOW_TRACKING_PASSWORD="$(id); `id`"\nEMPTY=\n'
    )
    assert read_env_file(f) == {
        "AWS_ACCESS_KEY_ID": "AKIA1",
        "AWS_SECRET_ACCESS_KEY": "a b=c",
        "MLFLOW_TRACKING_PASSWORD": "$(id); `id`",  # kept as text, never run
        "EMPTY": "",
    }


@pytest.mark.parametrize("line", ["no equals s3cr3t", "1ABC=s3cr3t", "BAD-KEY=s3cr3t", "=s3cr3t"])
def test_a_bad_line_is_refused_naming_file_and_line_but_not_the_value(tmp_path, line):
    f = tmp_path / "hfi-env"
    f.write_text(f"OK=1\n{line}\n")
    with pytest.raises(ValueError, match=r"hfi-env: line 2: expected KEY=VALUE") as e:
        read_env_file(f)
    assert "s3cr3t" not in str(e.value)  # a secret never reaches a log


@pytest.mark.parametrize("config", ["", "configs/toyworld-striped.yaml"])
def test_a_step_without_an_absolute_config_says_in_one_line_where_a_scheduled_run_finds_one(config, tmp_path, capsys):
    # A scheduled run has no conf; with neither HFI_CONFIG nor the hfi_config Variable set, the
    # DAG renders an empty --config. A relative path would be read from a worker's temporary folder.
    from tasks.cli import main

    assert main(["step", "generate", "--config", config, "--run-uri", str(tmp_path / "night")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absolute path or an s3:// URI" in err
    assert "HFI_CONFIG" in err and "hfi_config" in err
    assert not (tmp_path / "night").exists()


def test_a_tracking_uri_with_a_user_part_gives_its_credentials_to_mlflows_variables_only(monkeypatch):
    from tasks.step import _credentials_to_environment

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert _credentials_to_environment("http://ops:p%40ss-9c@mlflow:5000/base") == "http://mlflow:5000/base"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ops" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss-9c"
    assert _credentials_to_environment("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert _credentials_to_environment("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"
