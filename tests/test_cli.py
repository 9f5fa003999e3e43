"""The command line: help texts, clean errors (no traceback, non-zero exit)."""

import subprocess
import sys

import pytest

from steerscale.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for verb in ("models", "generate", "extract", "sweep"):
        assert verb in out


def test_unknown_model_is_one_clean_error(capsys):
    assert main(["generate", "-m", "no-such-model", "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "Traceback" not in err and "hint:" in err


def test_missing_gguf_and_bad_dtype(capsys, tmp_path):
    assert main(["generate", "-m", str(tmp_path / "x.gguf"), "-p", "hi"]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    assert main(["generate", "--dtype", "int3", "-p", "hi"]) == 2
    assert "unknown dtype" in capsys.readouterr().err


def test_corrupt_gguf_is_named(capsys, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    assert main(["generate", "-m", str(bad), "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert "could not read GGUF file" in err and "Traceback" not in err


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "gemma3-270m" in out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "steerscale.cli", "models"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "smollm2-135m-instruct" in out.stdout
