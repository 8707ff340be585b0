"""qkv eval: every argument is checked before any work, with one line naming the valid choices."""

import subprocess
import sys

import pytest
import torch

from qkv import cli
from qkv.errors import ConfigError
from qkv.evaluation import run as run_module


@pytest.fixture
def no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("run_eval ran although an argument was bad")

    monkeypatch.setattr(run_module, "run_eval", fail)


def error_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no usage block, no traceback
    return err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--datasets", "minilm,nope"], "unknown dataset 'nope'; valid: whisper-encoder, whisper-decoder, minilm, wan"),
        (["--datasets", ","], "no dataset given; valid: whisper-encoder"),
        (["--policies", "qvg,nope,x"], "unknown preset 'nope', 'x'; valid: qvg, qvg-pro, qvg-int4, qvg-ref, rtn"),
        (["--layers", "0"], "--layers: expected an integer >= 1, got '0'"),
        (["--heads", "two"], "--heads: expected an integer >= 1, got 'two'"),
        (["--device", "tpu"], "unknown device 'tpu'; valid: auto, cpu, cuda, cuda:<index>"),
        (["--device", "cuda:99"], "device 'cuda:99' is not available here"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_work(capsys, no_work, argv, expected):
    err = error_line(capsys, ["eval", *argv])
    assert err.startswith("qkv eval: error: ") and expected in err and "(see qkv eval --help)" in err


def test_an_output_folder_that_cannot_be_written_fails_before_any_work(capsys, no_work, tmp_path):
    (tmp_path / "file").touch()
    err = error_line(capsys, ["eval", "--out", str(tmp_path / "file" / "sub")])
    assert err.startswith("qkv eval: error: cannot write to ")


def test_unknown_command_and_option(capsys):
    assert "qkv: error: argument command: invalid choice: 'nope' (choose from 'eval', 'list')" in error_line(capsys, ["nope"])
    assert "qkv: error: unrecognized arguments: --bogus (see qkv --help)" in error_line(capsys, ["eval", "--bogus"])


def test_the_module_entry_point_prints_no_traceback():
    done = subprocess.run([sys.executable, "-m", "qkv", "eval", "--datasets", "nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("qkv eval: error: argument --datasets: unknown dataset 'nope'")


def test_help_names_the_choices_defaults_and_costs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("whisper-encoder, whisper-decoder, minilm, wan", "qvg, qvg-pro, qvg-int4", "(default: all)",
                   "results/eval/quick", cli.QUICK_COST, cli.FULL_COST, "~/.cache/qkv/realdata", "resumes"):
        assert needle in text, needle
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "``" not in capsys.readouterr().out


@pytest.mark.parametrize("exc, code, message", [
    (KeyboardInterrupt(), 130, "interrupted: finished rows are in"),
    (ConfigError("kmeans: clusters must be >= 1"), 1, "qkv eval: error: kmeans: clusters must be >= 1"),
])
def test_interrupts_and_qkv_errors_end_in_one_line(capsys, monkeypatch, tmp_path, exc, code, message):
    def raise_(*args, **kwargs):
        raise exc

    monkeypatch.setattr(run_module, "run_eval", raise_)
    assert cli.main(["eval", "--out", str(tmp_path)]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_run_prints_the_table_and_where_time_went(capsys, fake_realdata, tmp_path):
    argv = ["eval", "--datasets", "minilm", "--policies", "rtn,bf16", "--no-matched", "--no-sweep", "--no-ablation",
            "--device", "cpu", "--quiet", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "== minilm: fake minilm; 1 of 2 layers, 2 of 3 heads, 96 tokens, D = 64" in out
    assert "2 rows (0 reused from an earlier run) on cpu: load" in out and "minor page faults" in out
    assert cli.main(argv) == 0
    assert "2 rows (2 reused from an earlier run)" in capsys.readouterr().out
    assert torch.device("cpu") == cli._device("cpu")
