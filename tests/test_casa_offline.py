"""CASA runs fully offline from the repository's site config.

Each check runs in a fresh interpreter with an empty HOME (no user config to lean on)
and an empty working directory, and asserts that measures conversions give the right
answers, that casaconfig loaded our site config with every auto-update off, that
nothing mentions a network or a download, and that no CASA log lands in the cwd.
"""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, SITECONFIG

pytestmark = pytest.mark.casa
NETWORK_WORDS = ("http", "download", "network", "urlopen", "socket", "errno", "timed out",
                 "auto-update", "auto update")

CONVERSIONS = r"""
import json, sys
sys.path.insert(0, ROOT)
import faust_imaging
casatools, casatasks = faust_imaging.import_casa()
import casaconfig.config as cfg
me, qa = casatools.measures(), casatools.quanta()
utc = me.epoch('UTC', '2020-01-01/00:00:00')
tai = me.measure(utc, 'TAI')
sgra = me.measure(me.direction('J2000', '17h45m40.0409s', '-29d00m28.118s'), 'GALACTIC')
alma = me.observatory('ALMA')
# LSRK velocity of a TOPO frequency needs the observatory, an epoch and the direction
me.doframe(alma); me.doframe(me.epoch('UTC', '2020-06-01/04:00:00'))
me.doframe(me.direction('J2000', '04h39m53.9s', '+26d03m09.4s'))
lsrk = me.measure(me.frequency('TOPO', '230.538GHz'), 'LSRK')
print(json.dumps({
    'tai_minus_utc_s': (tai['m0']['value'] - utc['m0']['value']) * 86400.0,
    'sgra_l_deg': qa.convert(sgra['m0'], 'deg')['value'] % 360.0,
    'sgra_b_deg': qa.convert(sgra['m1'], 'deg')['value'],
    'alma_height_m': alma['m2']['value'],
    'lsrk_minus_topo_hz': lsrk['m0']['value'] - 230.538e9,
    'loaded': cfg.load_success(), 'failures': cfg.load_failure(),
    'measures_auto_update': cfg.measures_auto_update, 'data_auto_update': cfg.data_auto_update,
    'measurespath': cfg.measurespath, 'logfile': cfg.logfile,
    'argv_seen_by_us': sys.argv[1:],
}))
"""


def _run(tmp_path, code, extra_args=(), env_extra=None):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "CASASITECONFIG": str(SITECONFIG),
           "CASA_LOGFILE": str(tmp_path / "casa.log")}
    env.update(env_extra or {})
    result = subprocess.run([sys.executable, "-c", f"ROOT = {str(ROOT)!r}\n" + code, *extra_args],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    return result, work


def _assert_quiet_offline(result, work):
    text = ("\n".join(result.stdout.splitlines()[:-1]) + result.stderr).lower()  # minus the JSON
    found = [w for w in NETWORK_WORDS if w in text]
    assert not found, f"network-related output {found}:\n{result.stderr}"
    assert list(work.iterdir()) == [], f"files left in the cwd: {list(work.iterdir())}"


def test_measures_conversions_offline(tmp_path):
    # a --config option on our command line must not be taken by casaconfig as --configfile
    result, work = _run(tmp_path, CONVERSIONS, extra_args=["--config", "faust.cfg"])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["tai_minus_utc_s"] == pytest.approx(37.0, abs=1e-4)     # leap seconds since 2017
    # Sgr A*: l = 359.944 deg, b = -0.046 deg (Reid & Brunthaler 2004)
    assert out["sgra_l_deg"] == pytest.approx(359.9442, abs=2e-3)
    assert out["sgra_b_deg"] == pytest.approx(-0.0462, abs=2e-3)
    assert out["alma_height_m"] == pytest.approx(5050, abs=50)
    # Earth's orbital + rotation + solar motion: |v| < 50 km/s -> |dnu| < 40 MHz, never 0
    assert 1e5 < abs(out["lsrk_minus_topo_hz"]) < 4e7
    assert str(SITECONFIG) in out["loaded"] and out["failures"] == {}
    assert out["measures_auto_update"] is False and out["data_auto_update"] is False
    assert out["measurespath"].endswith("__data__") and "casadata" in out["measurespath"]
    assert out["logfile"] == str(tmp_path / "casa.log")
    assert out["argv_seen_by_us"] == ["--config", "faust.cfg"]       # argv restored
    _assert_quiet_offline(result, work)


def test_default_casa_log_goes_to_tmp_not_cwd(tmp_path):
    code = CONVERSIONS.replace("import casaconfig.config as cfg",
                               "import casaconfig.config as cfg; cfg_log = cfg.logfile")
    result, work = _run(tmp_path, code, env_extra={"CASA_LOGFILE": ""})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "astro-toolkit-casa-logs" in out["logfile"]
    assert list(work.iterdir()) == []


def test_tensorflow_first_then_casa_does_not_crash(tmp_path):
    # tensorflow before casatools aborts the process (STACK-NOTES) unless import_casa
    # applies RTLD_DEEPBIND; clover + faust in one process rely on this.
    code = "import tensorflow\n" + CONVERSIONS
    result, work = _run(tmp_path, code, env_extra={"TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["tai_minus_utc_s"] == pytest.approx(37.0, abs=1e-4)
