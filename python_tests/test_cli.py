"""The sled command: help, errors as one line with exit status 2, and real runs on SmolLM2."""
import subprocess
import sys

import pytest

from sled_ext.hub import pull


def sled(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "sled_ext.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(result, message):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_help_lists_the_commands():
    result = sled("--help")
    assert result.returncode == 0
    for command in ("compare", "generate", "score", "models", "step"):
        assert command in result.stdout


def test_unknown_method_and_bad_layers_are_usage_errors():
    assert_one_line_error(sled("generate", "--method", "beam"), "invalid choice: 'beam'")
    assert_one_line_error(sled("generate", "--layers", "1,x"), "comma-separated ints")


def test_a_bad_model_path_is_one_line(tmp_path):
    result = sled("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert_one_line_error(result, "sled: error:")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def smollm2():
    return str(pull("smollm2-135m"))


def test_impossible_settings_are_one_line(smollm2):
    assert_one_line_error(sled("generate", "--model", smollm2, "--evolution-scale", "10000000"),
                          "evolution_scale (k) must be in [1, V] = [1, 49152]")
    assert_one_line_error(sled("score", "--model", smollm2, "--prompt", "a",
                               "--continuation", "b", "--layers", "99"),
                          "premature layers must be in [0, 29]")


def test_compare_and_score_run(smollm2):
    result = sled("compare", "--model", smollm2, "--max-new-tokens", "6",
                  "--prompt", "Q: What is the capital of France?\nA:")
    assert result.returncode == 0, result.stderr
    assert "greedy" in result.stdout and "sled" in result.stdout
    result = sled("score", "--model", smollm2, "--prompt", "Q: What is the capital of France?\nA:",
                  "--continuation", " Paris", "--continuation", " Berlin")
    assert result.returncode == 0, result.stderr
    assert "' Paris'" in result.stdout and "' Berlin'" in result.stdout
