"""`largen serve`: every bad option is one line and exit status 2, before anything is served."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from inference.cli import main


@pytest.fixture
def model(tiny_zoo):
    return str(tiny_zoo / "largen-pipeline")


def run(capsys, *argv):
    code = main(["serve", *argv])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--port", "70000"], "largen serve: error: argument --port: must be a port number in [0, 65535], got '70000'"),
        (["--max-queue", "0"], "largen serve: error: argument --max-queue: must be a whole number >= 1, got '0'"),
        (["--timeout", "-1"], "argument --timeout: must be a number of seconds > 0"),
        (["--steps", "0"], "argument --steps: must be a whole number >= 1"),
    ],
)
def test_bad_option_values(capsys, model, argv, words):
    code, err = run(capsys, "--model", model, *argv)
    assert code == 2, err
    assert err.strip() == words if words.startswith("largen") else words in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--model", "/nonexistent/model"], "largen: error: --model '/nonexistent/model' does not exist"),
        (["--profile", "huge"], "--profile 'huge': "),
        (["--config", "pipelines.yaml"], "--config needs --profile"),
        (["--profile", "tiny", "--config", "/nonexistent.yaml"], "--config '/nonexistent.yaml' is not a file"),
        (["--device", "cuda:7"], "--device 'cuda:7'"),
        (["--host", "no.such.host.invalid"], "--host 'no.such.host.invalid' is not an address"),
    ],
)
def test_bad_options_are_one_line(capsys, model, argv, words):
    if argv[0] != "--model":
        argv = ["--model", model, "--port", "0", *argv]
    else:
        argv = [*argv, "--port", "0"]
    code, err = run(capsys, *argv)
    assert code == 2 and words in err and err.startswith("largen: error: "), err
    assert len(err.strip().splitlines()) == 1


def test_a_taken_port_is_one_line(capsys, model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, err = run(capsys, "--model", model, "--port", str(port))
    assert code == 2 and err.strip() == f"largen: error: cannot listen on --host '127.0.0.1' --port {port}: Address already in use"


def test_help_and_the_own_entry_point(repo_root):
    out = subprocess.run([sys.executable, "-m", "serving.cli", "--help"], cwd=repo_root, capture_output=True, text=True)
    assert out.returncode == 0 and "--max-queue" in out.stdout and "--profile" in out.stdout


def test_inference_never_imports_serving_or_dataengine(repo_root):
    # docs/architecture.md: `largen serve` reaches `serving` by name at run time only.
    code = ("import sys, inference.cli, inference.pipeline, inference.session; inference.cli.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'serving', 'dataengine', 'training'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
