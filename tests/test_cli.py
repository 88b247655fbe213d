"""The command line: --help lists the subcommands that exist; unknown ones are refused."""
import subprocess
import sys

import pytest

from megatron_mole import cli


def test_help_lists_existing_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name, _, _ in cli._available():
        assert name in out
    assert "smoke" in out


def test_python_m_runs_the_same_cli():
    result = subprocess.run([sys.executable, "-m", "megatron_mole", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "smoke" in result.stdout


def test_unknown_subcommand_is_named(capsys):
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
