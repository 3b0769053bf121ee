"""Several tools ``execfile``d into one CASA session namespace must not break each other
(issue 18 items 1-3): each tool's functions keep their own ``log``, ``get_config``, ``main``
whatever is exec'd after them; ``execfile`` without ``__file__`` still finds the shipped
data; the venv's own Python imports casatasks offline without ``CASASITECONFIG``."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

MODULES = ["faust_imaging", "clover", "autospec", "racs_pipeline", "ir_blobs"]
ORDERS = [MODULES, MODULES[::-1], ["clover", "faust_imaging", "ir_blobs", "racs_pipeline", "autospec"]]


def _execfile(name, namespace, with_file=True):
    path = ROOT / f"{name}.py"
    if with_file:
        namespace["__file__"] = str(path)
    else:
        namespace.pop("__file__", None)
    exec(compile(path.read_text(), str(path), "exec"), namespace)


def _check_tool(namespace, name, tmp_path):
    """The tool's main, its config round trip and one real call, through the session."""
    tool = namespace[name]
    assert tool.__name__ == name and tool.main(["--version"]) == 0
    cfg = tmp_path / f"{name}.cfg"
    assert tool.main(["--write-config", str(cfg)]) == 0
    config = tool.load_config(tool.CONFIG_SCHEMA, cfg)
    assert sorted(config.as_dict()) == sorted({k.section for k in tool.CONFIG_SCHEMA})
    assert tool.main(["--no-such-option"]) == 2
    return tool


@pytest.mark.parametrize("order", ORDERS, ids=["forward", "reverse", "mixed"])
def test_five_tools_in_one_session_namespace(order, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["casa", "--nogui"])
    session = {"__name__": "__main__", "casalog": object()}     # CASA's interactive namespace
    for name in order:
        _execfile(name, session)
    for name in MODULES:
        _check_tool(session, name, tmp_path)
    # the real calls: each resolves its own helpers although another tool's names are bare
    faust = session["faust_imaging"]
    assert faust.get_config()["Imaging"]["kind"] == "joint"                # not clover's config
    assert faust.main(["list", "targets", "-q"]) == 0 and "CB68" in capsys.readouterr().out
    assert session["ImageConfig"].__module__ == "faust_imaging"            # only faust defines it
    catalog = session["load_catalog"]()                                    # a bare faust name
    assert "CB68" in catalog.targets
    clover = session["clover"]
    assert clover.log.name == "clover" and faust.log.name == "faust_imaging"
    assert session["racs_pipeline"].main(["process", "-q", str(tmp_path / "missing.fits")]) == 2
    assert "missing.fits" in capsys.readouterr().err
    last = order[-1]
    assert session["main"] is session[last].main                           # bare names: the last tool's


def test_execfile_without_file_finds_the_shipped_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                     # the cwd holds nothing of the repository
    session = {"__name__": "__main__", "casalog": object()}
    _execfile("faust_imaging", session, with_file=False)
    assert session["HERE"] == ROOT
    assert "CB68" in session["load_catalog"]().targets
    assert session["faust_imaging"].__file__ == str(ROOT / "faust_imaging.py")


def test_exec_from_a_string_fails_loudly_naming_the_missing_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    session = {"__name__": "__main__", "casalog": object()}
    exec(compile((ROOT / "faust_imaging.py").read_text(), "<string>", "exec"), session)
    with pytest.raises(session["InputError"], match=r"faust_spws.csv not found .*exec'd from a string"):
        session["load_catalog"]()


def test_import_works_too():
    import faust_imaging
    assert faust_imaging.main(["--version"]) == 0 and faust_imaging.adopt_into_session(
        vars(faust_imaging), "faust_imaging") is None


@pytest.mark.casa
def test_plain_import_casatasks_in_the_venv_is_offline(tmp_path):
    """`python -c "import casatasks"` with no CASASITECONFIG: the venv carries the site config."""
    env = {k: v for k, v in os.environ.items() if k != "CASASITECONFIG"}
    env["HOME"] = str(tmp_path)                     # no ~/.casa/config.py to lean on
    code = ("import casatasks, casatools, casaconfig.config as c; "
            "print('ok', c.measures_auto_update, c.data_auto_update)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok False False" in result.stdout
    assert not list(tmp_path.glob("casa-*.log"))
