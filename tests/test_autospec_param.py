"""AutoSpec's param.py files: read safely, validated, every error named."""
import pytest

import autospec
from conftest import ROOT


def _write(tmp_path, text):
    path = tmp_path / "param.py"
    path.write_text(text)
    return path


def test_shipped_example_param_file_loads_with_types():
    values = autospec.read_param_file(ROOT / "configs" / "autospec_param.py")
    config = autospec.load_config(autospec.CONFIG_SCHEMA, overrides=values)
    section = config["autospec"]
    assert section["MODE"] == "param"
    assert section["APER"] == [1.0, 1.5, 2.0]
    assert section["DATA_EXT"] == [] and section["IMG"] == []
    assert section["XCOR"] is True and section["OUT_SUB"] is False
    assert section["SIZE"] == 5.0 and section["CONT_POLY"] == 5


def test_original_forms_are_accepted(tmp_path):
    path = _write(tmp_path, "DATA_EXT = (1, 2)\nAPER = 2.0\nIMG = 'a.fits', 'b.fits'\n"
                            "mode = 'cat'\n")
    config = autospec.load_autospec_config(param=path)["autospec"]
    assert config["DATA_EXT"] == ["1", "2"]
    assert config["APER"] == [2.0]
    assert config["IMG"] == ["a.fits", "b.fits"]
    assert config["MODE"] == "cat"


def test_errors_name_file_line_parameter_and_allowed_values(tmp_path):
    path = _write(tmp_path, "MODE = 'both'\nAPERTURE = 2.0\nSIZE = 2 * 3\nimport os\n"
                            "CONT_POLY = -1\n")
    with pytest.raises(autospec.ConfigError) as info:
        autospec.read_param_file(path)
    message = str(info.value)
    assert f"{path}, line 1: MODE = 'both' is invalid: expected one of 'param', 'cat'" in message
    assert f"{path}, line 2: unknown parameter 'APERTURE'; known parameters are" in message
    assert f"{path}, line 3: SIZE must be a plain value" in message
    assert f"{path}, line 4: only 'NAME = value' assignments" in message
    assert "line 5: CONT_POLY = -1 is invalid: expected an integer in [0, 20]" in message


def test_param_file_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    path = _write(tmp_path, f"open({str(marker)!r}, 'w')\n")
    with pytest.raises(autospec.ConfigError):
        autospec.read_param_file(path)
    assert not marker.exists()


def test_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(autospec.ConfigError, match="is not valid Python"):
        autospec.read_param_file(_write(tmp_path, "MODE = 'param\n"))
    with pytest.raises(autospec.ConfigError, match="does not exist; give one with --param"):
        autospec.read_param_file(tmp_path / "nope.py")


def test_cli_precedence_and_exit_codes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "MODE = 'cat'\nSIZE = 7.0\n")          # ./param.py is picked up
    config = autospec.load_autospec_config(overrides={("autospec", "SIZE"): "9"})
    assert config["autospec"]["MODE"] == "cat" and config["autospec"]["SIZE"] == 9.0
    bad = tmp_path / "bad.py"
    bad.write_text("OBJ_MASK = 'xor'\n")
    assert autospec.main(["--param", str(bad), "-q"]) == 2
    assert "OBJ_MASK = 'xor' is invalid: expected one of 'intersection', 'union'" in \
        capsys.readouterr().err
