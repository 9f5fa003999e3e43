"""The command line: help texts, clean errors (no traceback, non-zero exit)."""

import argparse
import shlex
import subprocess
import sys

import pytest

from steerscale.cli import COMMANDS, build_parser, main


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


def _verbs() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and every verb's parser, read from the parser itself (not from a list kept here)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, dict(sub.choices)


def _shell_commands(lines: list[str]) -> list[list[str]]:
    """The ``steerscale ...`` commands of an examples block, read as a shell reads them: a quoted argument or a
    trailing backslash carries the command on to the next line."""
    out, i = [], 0
    while i < len(lines):
        text = lines[i].strip()
        i += 1
        if not text.startswith("steerscale "):
            continue
        while True:
            try:
                if text.endswith("\\"):
                    raise ValueError("continued")
                out.append(shlex.split(text, comments=True))
                break
            except ValueError:
                assert i < len(lines), f"an example never ends: {text!r}"
                text = (text[:-1] if text.endswith("\\") else text + "\n") + lines[i].strip()
                i += 1
    return out


def test_every_verb_has_examples_that_parse():
    parser, verbs = _verbs()
    assert set(verbs) == set(COMMANDS) | set(COMMANDS.aliases) and len(verbs) >= 12
    for name, verb in verbs.items():
        text = verb.format_help()
        assert "\nexamples:\n" in text, f"steerscale {name} --help has no examples section"
        block = text.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0]
        commands = _shell_commands(block.splitlines())
        assert any(c[1] == COMMANDS.canonical(name) for c in commands), f"no `steerscale {name}` example"
        for argv in commands:  # every example names real flags with valid values (runs are checked by hand)
            parser.parse_args(argv[1:])


def test_help_lists_every_registered_command(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, description in COMMANDS.describe():
        assert f"    {name}" in out and description in out, name


def test_unknown_command_suggests_the_closest(capsys):
    assert main(["extrct", "--pairs", "formal_casual"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'extrct'; did you mean 'extract'?" in err and "Traceback" not in err


def test_a_verb_the_registry_lacks_is_refused():
    from steerscale.cli import _Verbs
    from steerscale.errors import SteerscaleError

    verbs = _Verbs(argparse.ArgumentParser().add_subparsers())
    with pytest.raises(SteerscaleError, match="does not list"):
        verbs.add_parser("frobnicate")
    assert verbs.add_parser("models").prog.endswith("models")  # a registered verb is added as usual
