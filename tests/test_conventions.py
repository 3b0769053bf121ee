"""The command-line and configuration conventions shared by all five tools.

Every module carries a copy of the "shared conventions" block (modules must stay
self-contained), generated from tools/conventions.py by ``make sync-conventions``; these tests
check that the copies equal the source and that each tool
behaves the same way: --help, --version, exit codes 0/1/2, config errors that name the
file, section, key, bad value and what is allowed, --set overrides, --write-config
templates that load back, and atomic outputs.
"""
import importlib
import os
import re

import pytest

from conftest import ROOT

MODULES = ["faust_imaging", "clover", "autospec", "racs_pipeline", "ir_blobs"]
BLOCK = re.compile(r"# >>> shared conventions >>>\n(.*?)# <<< shared conventions <<<", re.S)
# One subcommand per tool that every test can call.
FIRST_SUBCOMMAND = {"faust_imaging": "run", "clover": "predict", "autospec": "run",
                    "racs_pipeline": "process", "ir_blobs": "predict"}


@pytest.fixture(params=MODULES)
def tool(request):
    return importlib.import_module(request.param)


def test_shared_block_is_generated_from_its_source():
    """tools/conventions.py is the source; each tool's copy must equal it (make sync-conventions)."""
    source = BLOCK.search((ROOT / "tools" / "conventions.py").read_text())
    assert source, "tools/conventions.py lacks the shared conventions block markers"
    blocks = {}
    for name in MODULES:
        match = BLOCK.search((ROOT / f"{name}.py").read_text())
        assert match, f"{name}.py lacks the shared conventions block markers"
        blocks[name] = match.group(1)
    differing = [name for name, text in blocks.items() if text != source.group(1)]
    assert not differing, f"shared conventions block differs from tools/conventions.py in: {differing} " \
                          f"(run make sync-conventions)"


def test_sync_conventions_rewrites_a_stale_copy(tmp_path, monkeypatch):
    import shutil
    import subprocess
    import sys
    for name in MODULES:
        shutil.copy(ROOT / f"{name}.py", tmp_path / f"{name}.py")
    (tmp_path / "tools").mkdir()
    for name in ("conventions.py", "sync_conventions.py"):
        shutil.copy(ROOT / "tools" / name, tmp_path / "tools" / name)
    stale = tmp_path / "clover.py"
    stale.write_text(stale.read_text().replace("def parse_bool(raw):", "def parse_bool(raw):  # edited", 1))
    script = str(tmp_path / "tools" / "sync_conventions.py")
    check = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and "clover.py" in check.stdout
    assert subprocess.run([sys.executable, script], capture_output=True, text=True).returncode == 0
    assert stale.read_text() == (ROOT / "clover.py").read_text()


def test_help_and_version_exit_zero(tool, capsys):
    assert tool.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in tool.SUBCOMMANDS:
        assert name in out
    assert tool.main(["--version"]) == 0
    assert tool.__version__ in capsys.readouterr().out


def test_every_subcommand_has_the_common_options(tool, capsys):
    for name in tool.SUBCOMMANDS:
        assert tool.main([name, "--help"]) == 0
        out = capsys.readouterr().out
        for option in ("--config", "--set", "--verbose", "--quiet", "--overwrite"):
            assert option in out, f"{tool.__name__} {name} --help lacks {option}"


def test_usage_error_exits_two(tool, capsys):
    assert tool.main([FIRST_SUBCOMMAND[tool.__name__], "--no-such-option"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    assert tool.main(["no-such-subcommand"]) == 2


def test_missing_config_file_exits_two(tool, tmp_path, capsys):
    missing = tmp_path / "missing.cfg"
    assert tool.main([FIRST_SUBCOMMAND[tool.__name__], "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err


def test_unknown_key_and_section_named_with_the_known_ones(tool, tmp_path, capsys):
    first = tool.CONFIG_SCHEMA[0]
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(f"[{first.section}]\nno_such_key = 1\n[NoSuchSection]\nx = 1\n")
    assert tool.main([FIRST_SUBCOMMAND[tool.__name__], "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: [{first.section}] unknown key 'no_such_key'" in err
    assert first.key in err                      # the known keys are listed
    assert "unknown section [NoSuchSection]" in err


def test_bad_value_names_file_section_key_value_and_allowed(tool, tmp_path, capsys):
    entry = next(k for k in tool.CONFIG_SCHEMA if k.type in ("int", "float", "bool"))
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(f"[{entry.section}]\n{entry.key} = banana\n")
    assert tool.main([FIRST_SUBCOMMAND[tool.__name__], "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: [{entry.section}] {entry.key} = 'banana' is invalid" in err
    assert entry.describe_allowed() in err


def test_all_problems_reported_at_once(tmp_path):
    import racs_pipeline as racs
    cfg = tmp_path / "parset.in"
    cfg.write_text("[GENERAL]\nclobber = maybe\n[ANALYSIS]\nsourcefinder = sextractor\n"
                   "weight_crop_value = 2\n")
    with pytest.raises(racs.ConfigError) as info:
        racs.load_config(racs.CONFIG_SCHEMA, cfg)
    message = str(info.value)
    assert "clobber = 'maybe' is invalid: expected one of true/false" in message
    assert "sourcefinder = 'sextractor' is invalid: expected one of 'aegean', 'pybdsf', 'selavy'" in message
    assert "weight_crop_value = '2' is invalid: expected a number in [0.0, 1.0]" in message


def test_values_are_typed_and_overrides_win(tmp_path):
    import faust_imaging as faust
    cfg = tmp_path / "f.cfg"
    cfg.write_text("[Paths]\ndata_dir = ~/data  # a comment\n[Imaging]\nweighting = -1\n"
                   "mask_scales = 0, 2.5\n")
    config = faust.load_config(faust.CONFIG_SCHEMA, cfg,
                               overrides={("Imaging", "weighting"): "1.5"})
    assert config["Paths"]["DATA_DIR"] == faust.Path("~/data").expanduser()
    assert config["Imaging"]["weighting"] == 1.5
    assert config["Imaging"]["mask_scales"] == [0.0, 2.5]
    assert config["Thresholds"]["clean_sigma"] == 3.0          # default
    with pytest.raises(faust.ConfigError, match=r"mask_scales = '-1' is invalid"):
        faust.load_config(faust.CONFIG_SCHEMA, overrides={("Imaging", "mask_scales"): "-1"})


def test_booleans_parsed_properly():
    import racs_pipeline as racs
    for word, value in [("True", True), ("yes", True), ("1", True), ("off", False), ("FALSE", False)]:
        config = racs.load_config(racs.CONFIG_SCHEMA, overrides={("GENERAL", "clobber"): word})
        assert config["GENERAL"]["clobber"] is value
    with pytest.raises(racs.ConfigError, match="clobber = 'ja' is invalid"):
        racs.load_config(racs.CONFIG_SCHEMA, overrides={("GENERAL", "clobber"): "ja"})


def test_set_option_overrides_and_rejects_malformed(tool, tmp_path, capsys):
    sub = FIRST_SUBCOMMAND[tool.__name__]
    assert tool.main([sub, "--set", "nodot=1"]) == 2
    assert "expected SECTION.KEY=VALUE" in capsys.readouterr().err
    assert tool.main([sub, "--set", "NoSection.key=1"]) == 2
    assert "unknown option [NoSection] key" in capsys.readouterr().err


def test_toml_config(tmp_path):
    import clover
    cfg = tmp_path / "clover.toml"
    cfg.write_text('[Predict]\nnh3 = true\nnproc = 3\n')
    config = clover.load_config(clover.CONFIG_SCHEMA, cfg)
    assert config["Predict"]["nh3"] is True and config["Predict"]["nproc"] == 3
    cfg.write_text('[Predict]\nnproc = 0\n')
    with pytest.raises(clover.ConfigError, match=r"nproc = 0 is invalid: expected an integer in \[1, inf\]"):
        clover.load_config(clover.CONFIG_SCHEMA, cfg)


def test_written_template_loads_back_to_the_defaults(tool, tmp_path, capsys):
    template = tmp_path / "template.cfg"
    assert tool.main(["--write-config", str(template)]) == 0
    config = tool.load_config(tool.CONFIG_SCHEMA, template)
    defaults = tool.load_config(tool.CONFIG_SCHEMA)
    assert config.as_dict() == defaults.as_dict()
    # never silently overwritten
    assert tool.main(["--write-config", str(template)]) == 2
    assert "exists already" in capsys.readouterr().err


@pytest.mark.parametrize("name, example", [
    ("faust_imaging", "faust_imaging.cfg"), ("clover", "clover.cfg"),
    ("autospec", "autospec.ini"), ("racs_pipeline", "racs_pipeline.in"),
    ("ir_blobs", "ir_blobs.cfg")])
def test_shipped_example_configs_are_valid(name, example):
    tool = importlib.import_module(name)
    tool.load_config(tool.CONFIG_SCHEMA, ROOT / "configs" / example)


def test_unimplemented_subcommand_placeholder_fails_with_exit_one():
    import argparse
    import ir_blobs
    placeholder = ir_blobs.not_yet_implemented(99)
    with pytest.raises(ir_blobs.ToolError, match=r"not implemented yet \(see issue #99\)") as err:
        placeholder(argparse.Namespace(command="later"), None)
    assert err.value.exit_code == 1


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    import clover
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with clover.atomic_output(target) as stream:
            stream.write("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with clover.atomic_output(target) as stream:
        stream.write("whole")
    with pytest.raises(clover.OutputExistsError, match="use --overwrite"):
        with clover.atomic_output(target) as stream:
            stream.write("again")
    assert target.read_text() == "whole"
    with clover.atomic_output(target, overwrite=True) as stream:
        stream.write("new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask    # not mkstemp's 0600


def test_autospec_defaults_to_run(capsys):
    import autospec
    assert autospec._with_default_subcommand(["--nproc", "2"]) == ["run", "--nproc", "2"]
    assert autospec._with_default_subcommand(["run", "--nproc", "2"]) == ["run", "--nproc", "2"]
    assert autospec.main(["--nproc", "2", "-q"]) == 2          # run, but nothing to run on
    assert "no parameters: there is no ./param.py and neither --param FILE nor --config FILE" \
        in capsys.readouterr().err


def test_warnings_on_the_command_line_are_one_log_line(tool, capfd):
    """A warning during a command is logged once as 'tool: WARNING ...', without the file:line and
    source line Python prints; one the tool has just logged is not repeated."""
    import warnings

    def command(args, config):
        tool.log.warning("already logged")
        warnings.warn("already logged", UserWarning)
        warnings.warn("only warned", RuntimeWarning)
        return 0

    parser = tool.build_cli("test", {"go": ("test", command, lambda p: None)}, "0", tool.CONFIG_SCHEMA)
    assert tool.run_cli(parser, ["go"]) == 0
    err = capfd.readouterr().err
    assert err.count("already logged") == 1
    assert "WARNING" in err and "only warned (RuntimeWarning)" in err
    assert ".py:" not in err and "warnings.warn" not in err


def test_mad_sigma_matches_the_gaussian_sigma_and_ignores_nans(tool):
    import numpy as np
    rng = np.random.default_rng(3)
    data = rng.normal(0.0, 2.5, (4, 20000))
    data[0, :100] = np.nan
    data[1, :50] = 1e6                       # outliers barely move it
    sigma = tool.mad_sigma(data, axis=1)
    assert sigma.shape == (4,) and np.allclose(sigma, 2.5, rtol=0.03), sigma
    assert np.isnan(tool.mad_sigma([np.nan, np.nan]))
    assert isinstance(tool.mad_sigma([1.0, 2.0, 3.0]), float)


def test_stage_ledger_reuses_only_what_the_same_settings_and_inputs_made(tmp_path, caplog):
    """Both layouts (one file for all stages; one file per stage), every reason to rerun."""
    import logging
    import racs_pipeline as tool
    source = tmp_path / "in.txt"
    source.write_text("a")
    msdir = tmp_path / "x.ms"
    (msdir / "sub").mkdir(parents=True)
    (msdir / "table.dat").write_text("t")
    out = tmp_path / "out.txt"
    for path in (tmp_path / "ledger.json", str(tmp_path / "base.{stage}.done.json")):
        ledger = tool.StageLedger(path)
        inputs = {"image": source, "ms": msdir}
        assert not ledger.current("a", [out], {"k": 1}, inputs)
        out.write_text("product")
        assert not ledger.current("a", [out], {"k": 1}, inputs)   # no record: not reused
        ledger.record("a", [out], {"k": 1}, inputs, rms=0.5)
        again = tool.StageLedger(path)
        assert again.current("a", [out], {"k": 1}, inputs)
        assert again.meta("a")["rms"] == 0.5
        with caplog.at_level(logging.WARNING, logger=tool.log.name):
            caplog.clear()
            assert not again.current("a", [out], {"k": 2}, inputs)
            assert "settings changed (k: 1 -> 2)" in caplog.text
        (msdir / "sub" / "new").write_text("n")                     # the MS changed
        assert "input(s) changed: ms" in again.why_not_current("a", [out], {"k": 1}, inputs)
        ledger.record("a", [out], {"k": 1}, inputs)
        out.unlink()
        again = tool.StageLedger(path)
        assert "output missing: out.txt" == again.why_not_current("a", [out], {"k": 1}, inputs)
        out.write_text("product")
        assert tool.StageLedger(path, overwrite=True).why_not_current("a", [out], {"k": 1}, inputs)
        again.clear("a")
        assert again.meta("a") == {} and tool.StageLedger(path).meta("a") == {}
    assert (tmp_path / "ledger.json").is_file() and not (tmp_path / "base.a.done.json").exists()


def test_write_provenance_records_version_argv_and_config(tool, tmp_path):
    import json
    config = tool.load_config(tool.CONFIG_SCHEMA)
    path = tool.write_provenance(tmp_path / "run.json", config, extra=1)
    info = json.loads(path.read_text())
    assert info["tool"] == tool.log.name and info["version"] == tool.__version__
    assert info["config"] == json.loads(json.dumps(config.as_dict(), default=str)) and info["extra"] == 1
    assert isinstance(info["argv"], list) and info["cwd"]
