"""`hfi step --env-file`: credentials reach the step's environment without a shell reading them."""

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
