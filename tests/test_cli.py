"""The command line: --help lists every subcommand; unknown ones are refused; a
subcommand whose module is missing, and any user error, is one line on stderr and
exit status 2; Megatron's optional-dependency warnings only with --verbose."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mole import cli

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL_WARNING = "Transformer Engine and Apex are not installed"


def _python_m(*args, env=None):
    """``python -m megatron_mole ARGS`` from this checkout, started (not waited for)."""
    env = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT))
    env.pop("MEGATRON_MOLE_VERBOSE", None)
    return subprocess.Popen([sys.executable, "-m", "megatron_mole", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ["quickstart", "train", "convert", "verify", "export", "bench", "memory", "smoke", "--verbose"]:
        assert name in out
    assert set(cli.SUBCOMMANDS) <= set(out.replace(",", " ").split())


def test_python_m_runs_the_same_cli():
    result = subprocess.run([sys.executable, "-m", "megatron_mole", "--help"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0 and "smoke" in result.stdout


def test_unknown_subcommand_is_named(capsys):
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_tools_commands_come_from_the_checkout():
    assert cli.load_command("smoke").__file__ == str(ROOT / "tools" / "smoke.py")
    assert cli.load_command("bench").__file__ == str(ROOT / "tools" / "bench.py")


def test_without_tools_folder_the_tool_commands_are_errors(monkeypatch, tmp_path, capsys):
    # a wheel install: no tools/ next to the package; the commands are still listed
    monkeypatch.setattr(cli, "TOOLS_DIR", tmp_path / "tools")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "smoke" in capsys.readouterr().out
    for name in ("smoke", "bench"):
        assert cli.main([name, "--help"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(f"megatron-mole {name}: error: needs tools/{name}.py") and "source checkout" in err


def test_missing_library_module_is_an_error(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "ghost", ("megatron_mole.no_such_module", "not built"))
    assert cli.main(["ghost"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "megatron-mole ghost: error:" in err and "megatron_mole.no_such_module" in err


def test_user_errors_are_one_line_exit_2(tmp_path, capsys):
    def memory(hf_config, config="x.yaml"):
        code = cli.main(["memory", "--hf-config", str(hf_config), "--config", str(config), "--world-size", "2"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("megatron-mole memory: error: "), err
        return err

    assert "nope.json" in memory(tmp_path / "nope.json")  # a missing file (an OSError)
    hf = tmp_path / "hf.json"
    hf.write_text("{}")  # used to be a KeyError traceback
    assert "'num_attention_heads' is missing" in memory(hf)
    hf.write_text(json.dumps(dict(num_attention_heads=4, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, vocab_size=256)))
    job = tmp_path / "job.yaml"
    job.write_text("base: {checkpoint: x}\ndata: {paths: [d.jsonl]}\nparallel: {tpp: 2}\n")
    assert "config 'parallel.tpp': unknown key" in memory(hf, job)  # a MoleError


def test_misspelt_mole_key_fails_before_megatron_starts(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(f"base: {{checkpoint: {tmp_path / 'base'}}}\ndata: {{paths: [{tmp_path / 'd.jsonl'}]}}\n"
                      "mole: {num_expert: 4}\n")
    proc = _python_m("train", "--config", str(config))  # no torchrun: must fail before any process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron-mole train: error: config 'mole.num_expert': "
                                                   "unknown key"), err


def test_megatron_optional_dependency_warnings_only_with_verbose():
    # Megatron-core warns when its optimizer module is imported (~6 s of CPU: both at once)
    def python(code):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("MEGATRON_MOLE_VERBOSE", None)
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    quiet = python("import megatron_mole.cli; import megatron.core.optimizer")
    verbose = python("import os; from megatron_mole import cli; assert cli.main(['--verbose']) == 0; "
                     "assert os.environ['MEGATRON_MOLE_VERBOSE'] == '1'; import megatron.core.optimizer")
    (_, quiet_err), (verbose_out, verbose_err) = quiet.communicate(timeout=180), verbose.communicate(timeout=180)
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet_err + verbose_err
    assert "usage: megatron-mole" in verbose_out
    assert OPTIONAL_WARNING not in quiet_err, quiet_err
    assert verbose_err.count(OPTIONAL_WARNING) >= 2, verbose_err
