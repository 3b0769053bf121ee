"""Tests of racs_pipeline.py (issue #7) on tiny synthetic data.

Unit tests use hand-worked values and an independent implementation (astropy) for the
crossmatch; integration tests run the whole pipeline (real AegeanTools) once on the
simulated field of tests/simulate_racs.py and check injection-recovery, outputs,
resuming and the database; PyBDSF runs for real too.  PostgreSQL tests use
TOOLKIT_PG_URL (tests/with_postgres.sh) or start their own throwaway server; under
CI=true they fail rather than skip when no server can be had.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import racs_pipeline as racs
import simulate_racs as sim_mod


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """The simulated field, processed once by the full pipeline (transients + stamps)."""
    root = tmp_path_factory.mktemp("racs_field")
    sim = sim_mod.simulate_field(root)
    parset = sim_mod.write_parset(sim, root / "parset.in", overlays=True, stamps=True)
    code = racs.main(["process", "-q", "-c", str(parset), str(sim["image"])])
    results = root / "askap_sim_results"
    return {"sim": sim, "parset": parset, "code": code, "results": results, "root": root}


def _image(tmp_path, name="img.fits", beam=True, freq=True, size=64, extra=None):
    from astropy.io import fits
    header = sim_mod._header(size, 2.5, 10.0, -40.0, 15.0, 12.0, 0.0, 887.5e6 if freq else None)
    if not beam:
        for key in ("BMAJ", "BMIN", "BPA"):
            del header[key]
    for key, value in (extra or {}).items():
        header[key] = value
    data = np.random.default_rng(0).normal(0, 1e-3, (size, size)).astype(np.float32)
    path = tmp_path / name
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


# ---------------------------------------------------------------------------
# science functions: hand-worked values
# ---------------------------------------------------------------------------
def test_spectral_index_extrapolation_hand_worked():
    # (1400/843)^-0.8 = exp(-0.8 ln 1.660735) = exp(-0.405808) = 0.666434
    assert racs.scale_flux(1.0, 843e6, 1.4e9) == pytest.approx(0.666434, rel=1e-5)
    # 10 mJy at 843 MHz seen at 887.5 MHz: 10 (887.5/843)^-0.8 = 9.59682 mJy (ln 1.052788 = 0.051441)
    assert racs.scale_flux(10.0, 843e6, 887.5e6) == pytest.approx(9.59682, rel=1e-5)
    # flat spectrum and the round trip
    assert racs.scale_flux(3.0, 1e9, 2e9, alpha=0.0) == 3.0
    assert racs.scale_flux(racs.scale_flux(2.0, 843e6, 1.4e9), 1.4e9, 843e6) == pytest.approx(2.0)


def test_flux_ratio_is_at_least_one_with_quadrature_error():
    ratio, err = racs.flux_ratio([3.0, 1.0], [0.3, 0.1], [1.0, 3.0], [0.1, 0.3])
    assert ratio == pytest.approx([3.0, 3.0])
    assert err == pytest.approx([3 * np.hypot(0.1, 0.1)] * 2)          # 0.424264
    ratio, _ = racs.flux_ratio([0.0], [0.1], [1.0], [0.1])
    assert np.isnan(ratio[0])


def test_variability_metrics_hand_worked():
    vs, m, m_abs = racs.variability_metrics(np.array([3.0]), np.array([0.3]), np.array([1.0]), np.array([0.4]))
    assert vs[0] == pytest.approx(2.0 / 0.5) and m[0] == pytest.approx(1.0) and m_abs[0] == pytest.approx(1.0)


def test_survey_beam_and_rms():
    assert racs.survey_beam("sumss", -30.0) == pytest.approx((90.0, 45.0, 0.0))
    assert racs.survey_beam("nvss", 10.0) == (45.0, 45.0, 0.0)
    assert racs.survey_rms("sumss", [-40.0, -60.0]) == pytest.approx([2e-3, 1.2e-3])


@pytest.mark.parametrize("dec, sumss_only, nvss_only, expected", [
    (-35.0, False, False, ["sumss", "nvss"]), (-50.0, False, False, ["sumss"]),
    (-28.0, False, False, ["nvss", "sumss"]), (-10.0, False, False, ["nvss"]),
    (-35.0, True, False, ["sumss"]), (-35.0, False, True, ["nvss"]), (-10.0, True, False, [])])
def test_determine_catalogues(dec, sumss_only, nvss_only, expected):
    assert racs.determine_catalogues(dec, sumss_only, nvss_only) == expected


def test_source_names():
    assert list(racs.source_names([0.0, 359.9999], [-35.5, 0.25])) == [
        "J000000.00-353000.0", "J235959.98+001500.0"]


# ---------------------------------------------------------------------------
# crossmatch: wrap-around, pole, independent implementation
# ---------------------------------------------------------------------------
def test_crossmatch_across_ra_wrap_and_near_pole():
    idx, sep = racs.crossmatch_nearest([359.9995, 0.0, 45.0], [0.0, 89.9999, 89.99995],
                                       [0.0005, 180.0, 300.0], [0.0, 89.9999, -10.0], max_sep=5.0)
    assert list(idx) == [0, 1, 1]
    assert sep[0] == pytest.approx(3.6, rel=1e-6)            # 0.001 deg across RA 0/360
    assert sep[1] == pytest.approx(0.72, rel=1e-5)           # opposite sides of the pole
    idx, sep = racs.crossmatch_nearest([10.0], [0.0], [10.01], [0.0], max_sep=5.0)
    assert idx[0] == -1 and np.isnan(sep[0])                 # 36" is beyond 5"


def test_crossmatch_agrees_with_astropy():
    from astropy.coordinates import SkyCoord
    rng = np.random.default_rng(3)
    ra1, dec1 = rng.uniform(0, 360, 2000), np.degrees(np.arcsin(rng.uniform(-1, 1, 2000)))
    ra2, dec2 = rng.uniform(0, 360, 3000), np.degrees(np.arcsin(rng.uniform(-1, 1, 3000)))
    idx, sep = racs.crossmatch_nearest(ra1, dec1, ra2, dec2)
    ref_idx, ref_sep, _ = SkyCoord(ra1, dec1, unit="deg").match_to_catalog_sky(SkyCoord(ra2, dec2, unit="deg"))
    assert np.array_equal(idx, ref_idx)
    assert sep == pytest.approx(ref_sep.arcsec, rel=1e-7, abs=1e-6)
    i, j, d = racs.pairs_within(ra1, dec1, ra2, dec2, 3600.0)
    brute = SkyCoord(ra1[:, None], dec1[:, None], unit="deg").separation(
        SkyCoord(ra2[None, :], dec2[None, :], unit="deg")).arcsec
    assert len(i) == int((brute <= 3600.0).sum())
    assert d == pytest.approx(brute[i, j], abs=1e-6)


def test_duplicate_matches_keep_the_closest():
    idx, n_dup = racs._unique_matches(np.array([4, 4, 2, -1]), np.array([10.0, 3.0, 1.0, np.nan]))
    assert list(idx) == [-1, 4, 2, -1] and n_dup == 1


def test_rms_map_and_edge_flags():
    rng = np.random.default_rng(1)
    data = rng.normal(0, 2e-3, (400, 400)).astype(np.float32)
    data[190:210, 190:210] += 1.0                 # a bright source must not inflate the rms
    data[:, :50] = np.nan
    bkg, rms = racs.rms_map(data, box=100)
    assert np.nanmedian(rms) == pytest.approx(2e-3, rel=0.05)
    assert np.isnan(rms[0, 0]) and abs(np.nanmedian(bkg)) < 2e-4
    assert racs.robust_rms(data) == pytest.approx(2e-3, rel=0.05)


def test_extended_flag_either_axis():
    flags = racs.flag_extended([10, 20, 10], [10, 10, 16], 15.0, 12.0, 1.2)
    assert list(flags) == [False, True, True]


# ---------------------------------------------------------------------------
# inputs and errors
# ---------------------------------------------------------------------------
def test_image_without_beam_is_a_clear_error(tmp_path, capsys):
    path = _image(tmp_path, beam=False)
    with pytest.raises(racs.InputError, match="has no beam: the header lacks BMAJ/BMIN"):
        racs.load_image(path)
    assert racs.main(["process", "-q", "--nice", "0", "--sumss-csv", str(tmp_path), str(path)]) == 2
    assert "has no beam" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:The WCS transformation has more axes")
def test_frequency_from_header_axis_or_option(tmp_path):
    path = _image(tmp_path, freq=False, extra={"CTYPE3": "FREQ", "CRVAL3": 1.3675e9})
    assert racs.load_image(path).frequency == 1.3675e9
    bare = _image(tmp_path, name="bare.fits", freq=False)
    with pytest.raises(racs.InputError, match=r"frequency = 887.5e6 or --frequency"):
        racs.load_image(bare)
    assert racs.load_image(bare, frequency=864e6).frequency == 864e6


def test_catalogue_with_missing_columns(tmp_path, capsys):
    bad = tmp_path / "sumss.csv"
    bad.write_text("_RAJ2000,_DEJ2000,flux\n10.0,-40.0,12.0\n")
    with pytest.raises(racs.InputError, match=r"lacks the column\(s\) St, e_St"):
        racs.read_survey_catalogue("sumss", bad)
    image = _image(tmp_path)
    askap = tmp_path / "askap.csv"
    askap.write_text("ra,dec,peak_flux\n10.0,-40.0,0.01\n")
    with pytest.raises(racs.InputError, match=r"lacks the column\(s\) err_peak_flux"):
        racs.read_askap_csv(askap)
    code = racs.main(["process", "-q", "--nice", "0", "--sumss-csv", str(bad), "--askap-csv", str(askap),
                      "--output-dir", str(tmp_path / "out"), str(image)])
    assert code == 2
    assert "lacks the column(s)" in capsys.readouterr().err


def test_parset_errors_exit_two(tmp_path, capsys):
    image = _image(tmp_path)
    parset = tmp_path / "bad.in"
    parset.write_text("[ANALYSIS]\nsourcefinder = sextractor\n[TRANSIENTS]\ntransients = maybe\n"
                      "transients_askap_sumss_snr_thresh = 5\n")
    assert racs.main(["process", "-c", str(parset), str(image)]) == 2
    err = capsys.readouterr().err
    assert "sourcefinder = 'sextractor' is invalid: expected one of 'aegean', 'pybdsf', 'selavy'" in err
    assert "transients = 'maybe' is invalid: expected one of true/false" in err
    assert "unknown key 'transients_askap_sumss_snr_thresh'" in err
    assert racs.main(["process", "--clobber", "perhaps", str(image)]) == 2
    assert "clobber = 'perhaps' is invalid" in capsys.readouterr().err
    assert racs.main(["process", "--sumss-only", "--nvss-only", str(image)]) == 2
    assert "sumss_only and nvss_only are both true" in capsys.readouterr().err
    assert racs.main(["process", "-q"]) == 2
    assert "no image given" in capsys.readouterr().err


def test_flags_override_the_parset(tmp_path):
    parset = tmp_path / "p.in"
    parset.write_text("[CROSSMATCHING]\ntransient_max_separation = 30\n[TRANSIENTS]\ntransients = false\n")
    parser = racs.build_cli("x", racs.SUBCOMMANDS, racs.__version__, racs.CONFIG_SCHEMA)
    argv = racs._bare_booleans(["process", "-c", str(parset), "--transient-max-separation", "20",
                                "--transients", "img.fits"])
    args = parser.parse_args(argv)
    assert args.images == ["img.fits"]
    config = racs.load_config(racs.CONFIG_SCHEMA, args.config, racs.parse_overrides(args.set))
    assert config["CROSSMATCHING"]["transient_max_separation"] == 20.0
    assert config["TRANSIENTS"]["transients"] is True


def test_unreachable_vizier_is_a_source_finding_only_run(tmp_path, monkeypatch, capsys):
    """No survey catalogue offline: the run still makes its own catalogue, exit 0, warning."""
    from astroquery.vizier import VizierClass

    def offline(*args, **kwargs):
        raise ConnectionError("Network is unreachable")
    monkeypatch.setattr(VizierClass, "query_region", offline)
    with pytest.raises(racs.CatalogueUnavailableError, match=r"Vizier could not be reached for SUMSS .*sumss_csv = FILE"):
        racs.fetch_survey_catalogue("sumss", 10.0, -40.0, 0.5)
    sim = sim_mod.simulate_field(tmp_path, size=400, n_faint=5, n_bright=10, n_transients=1, mosaic=False)
    code = racs.main(["process", "--nice", "0", "--transients", str(sim["image"])])
    assert code == 0
    err = capsys.readouterr().err
    assert "Vizier could not be reached for SUMSS" in err and "--sumss-csv FILE" in err
    assert "source finding only" in err
    results = tmp_path / "askap_sim_results"
    summary = json.loads((results / "askap_sim_summary.json").read_text())
    assert summary["mode"] == "source finding only" and summary["surveys"] == []
    truth = sim["truth"]
    bright = truth[truth["askap_flux"] > 0.01]
    comp = racs.read_table(results / "askap_sim_comp.csv")
    idx, _ = racs.crossmatch_nearest(bright["ra"], bright["dec"], comp["ra"], comp["dec"], max_sep=3.0)
    assert (idx >= 0).all() and summary["n_askap"] >= len(bright)
    db = racs.RacsDatabase("sqlite:///%s" % (results / "racs.sqlite"))
    assert db.count("images") == 1 and db.count("sources") == summary["n_askap"] and db.count("crossmatches") == 0
    assert not (results / "transients").exists()


def test_vizier_download_is_cached(tmp_path, monkeypatch):
    from astropy.table import Table
    from astroquery.vizier import VizierClass
    calls = []

    def fake(self, *args, **kwargs):
        calls.append(kwargs["catalog"])
        return [Table({"_RAJ2000": [10.0, 10.1], "_DEJ2000": [-40.0, -40.1], "S1.4": [5.0, 7.0],
                       "e_S1.4": [0.5, 0.5], "PA": [np.nan, 10.0]})]
    monkeypatch.setattr(VizierClass, "query_region", fake)
    first = racs.fetch_survey_catalogue("nvss", 10.0, -40.0, 0.5, cache_dir=tmp_path)
    second = racs.fetch_survey_catalogue("nvss", 10.0, -40.0, 0.5, cache_dir=tmp_path)
    assert calls == [["VIII/65/nvss"]]
    assert list(first["flux"]) == pytest.approx([5e-3, 7e-3]) and list(first["pa"]) == [0.0, 10.0]
    assert second[["ra", "dec", "flux"]].equals(first[["ra", "dec", "flux"]])


def test_aegean_settings_file(tmp_path):
    settings = tmp_path / "aegean.cfg"
    settings.write_text("[aegean]\ncores = 1\nseedclip = 6\nfloodclip = 3.5\nnocov = false\nautoload = true\n")
    resolved, kwargs = racs.read_aegean_settings(settings)
    assert kwargs == {"cores": 1, "max_summits": 5, "innerclip": 6.0, "outerclip": 3.5, "docov": True}
    assert racs.read_aegean_settings()[1]["docov"] is False       # seed default: nocov
    settings.write_text("[aegean]\nseedclips = 6\n")
    with pytest.raises(racs.ConfigError, match="unknown key 'seedclips'"):
        racs.read_aegean_settings(settings)


def test_weight_crop_and_astropy_convolution(tmp_path):
    from astropy.io import fits
    image = _image(tmp_path, size=128)
    data = np.zeros((128, 128), np.float32)
    data[64, 64] = 1.0
    hdr = fits.getheader(image)
    fits.PrimaryHDU(data, header=hdr).writeto(image, overwrite=True)
    weights = tmp_path / "weights.fits"
    w = np.ones((128, 128), np.float32)
    w[:, :10] = 0.01
    fits.PrimaryHDU(w).writeto(weights)
    cropped = racs.weight_crop(image, weights, 0.04, tmp_path / "crop.fits")
    out = fits.getdata(cropped)
    assert np.isnan(out[:, :10]).all() and np.isfinite(out[:, 10:]).all()
    # a point source (peak 1 Jy/beam in a 15"x12" beam) stays 1 Jy/beam in a 45"x45" beam
    from scipy.ndimage import gaussian_filter
    fwhm = 2 * np.sqrt(2 * np.log(2))
    point = gaussian_filter(data, (15 / 2.5 / fwhm, 12 / 2.5 / fwhm))
    point /= point.max()
    fits.PrimaryHDU(point, header=hdr).writeto(image, overwrite=True)
    conv = racs.convolve_to_beam(image, (45.0, 45.0, 0.0), tmp_path / "conv.fits", method="astropy")
    assert np.nanmax(fits.getdata(conv)) == pytest.approx(1.0, rel=0.03)
    assert fits.getheader(conv)["BMAJ"] == pytest.approx(45 / 3600)


def test_annotation_files(tmp_path):
    ann = racs.write_ann(tmp_path / "a.ann", [1.0], [-2.0], [36.0], [18.0], [30.0], "RED", ["src"])
    text = ann.read_text()
    assert "COLOR RED" in text and "ELLIPSE W 1.000000 -2.000000 0.005000 0.002500 30.00" in text
    reg = racs.write_ds9_region(tmp_path / "a.reg", [1.0], [-2.0], [36.0], [18.0], [30.0])
    assert 'ellipse(1.000000,-2.000000,18.00",9.00",120.00)' in reg.read_text()


# ---------------------------------------------------------------------------
# the whole pipeline on the simulated field (real AegeanTools)
# ---------------------------------------------------------------------------
def _master(field):
    return racs.read_table(field["results"] / "transients" / "transients_master.csv")


def test_injected_transients_recovered_and_classified(field):
    assert field["code"] == 0
    truth = field["sim"]["truth"]
    score = sim_mod.score_candidates(_master(field), truth)
    for kind in ("askap_only", "catalogue_only", "large_ratio"):
        assert score[kind]["found"] == score[kind]["injected"] == 3, score
    assert score["false_candidates"] <= 2 * len(truth) / 500, score


def test_forced_photometry_recovers_faint_fluxes(field):
    truth = field["sim"]["truth"]
    faint = truth[(truth["kind"] == "catalogue_only") & (truth["askap_flux"] > 0)]
    master = _master(field)
    rows = master[master["transient_type"] == "noaskapmatch"]
    idx, _ = racs.crossmatch_nearest(faint["ra"], faint["dec"], rows["ra"], rows["dec"], max_sep=10.0)
    assert (idx >= 0).all()
    measured = rows.iloc[idx]
    pull = (measured["forced_flux"].to_numpy() - faint["askap_flux"].to_numpy()) / measured["forced_flux_err"].to_numpy()
    assert np.all(np.abs(pull) <= 2.0), pull


def test_aegean_finds_the_bright_injected_sources(field):
    comp = racs.read_table(field["results"] / "askap_sim_comp.csv")
    truth = field["sim"]["truth"]
    bright = truth[truth["kind"].isin(["askap_only", "large_ratio"])]
    idx, sep = racs.crossmatch_nearest(bright["ra"], bright["dec"], comp["ra"], comp["dec"], max_sep=3.0)
    assert (idx >= 0).all()
    assert comp["int_flux"].to_numpy()[idx] == pytest.approx(bright["askap_flux"].to_numpy(), rel=0.1)


def test_outputs_written(field):
    results = field["results"]
    for name in ("askap_sim_comp.csv", "askap_sim_sumss_comp.csv", "askap_sim_nvss_comp.csv",
                 "askap_sim_sumss_askap_crossmatch_diagnostic.csv", "askap_sim_sumss_askap_crossmatch_diagnostic.fits",
                 "askap_sim_sumss_askap_crossmatch_diagnostic.vot", "askap_sim_askap.ann", "askap_sim_sumss.reg",
                 "askap_sim_sumss_flux_ratio_vs_askap_flux.png", "askap_sim_position_offset_from_sumss.png",
                 "askap_sim_source_counts.png", "askap_sim_askap_source_overlay.png", "askap_sim_rms.fits",
                 "transients/transients_master.csv", "transients/transients_candidates.vot",
                 "transients/transients_sources_no_askap_match.fits", "racs.sqlite", "config_used.in"):
        assert (results / name).is_file(), name
    summary = json.loads((results / "askap_sim_summary.json").read_text())
    assert summary["surveys"] == ["sumss", "nvss"] and summary["matched_to"] == "SUMSS & NVSS"
    assert summary["n_candidates"] == 9
    assert 0.9 < summary["median_flux_ratio"]["sumss"] < 1.1
    stamps = sorted((results / "postage-stamps").glob("*.jpg"))
    assert len(stamps) == 9
    from astropy.table import Table
    assert len(Table.read(results / "transients" / "transients_candidates.vot")) == 9


def test_rerun_resumes_and_does_not_duplicate_rows(field, capsys):
    """A re-run with the same inputs and settings reuses every stage (by the stage ledger, not
    by timing): the records say how each product was made, the log says "reusing", and no
    output, nor the ledger, is rewritten (st_mtime_ns); the database gains no row."""
    results, image = field["results"], field["sim"]["image"]
    ledger = json.loads((results / racs.STAGE_LEDGER_FILE).read_text())
    stages = ["catalogue_nvss", "catalogue_sumss", "plane", "rms", "sources", "transients"]
    assert sorted(ledger) == stages
    assert all(entry["stage"] == stage and entry["version"] == racs.__version__ for stage, entry in ledger.items())
    assert ledger["plane"]["inputs"] == {"image": racs.file_digest(image)}
    assert ledger["plane"]["outputs"] == []                       # a 2-D image is read as it is
    assert ledger["rms"]["outputs"] == ["askap_sim_bkg.fits", "askap_sim_rms.fits"]
    assert ledger["rms"]["settings"]["rms_box"] == 125                                 # the parset's
    assert ledger["sources"]["inputs"]["rms"] == racs.file_digest(results / "askap_sim_rms.fits")
    assert ledger["catalogue_sumss"]["inputs"]["catalogue"] == racs.file_digest(field["sim"]["sumss_csv"])
    assert "transients_master.csv" in ledger["transients"]["outputs"]
    files = [results / racs.STAGE_LEDGER_FILE] + [next(results.rglob(name)) for e in ledger.values()
                                                   for name in e["outputs"]]
    assert len(files) == 1 + 2 + 1 + 2 + 6
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    db = racs.RacsDatabase("sqlite:///%s" % (results / "racs.sqlite"))
    before = {t: db.count(t) for t in ("images", "sources", "crossmatches", "transients")}
    capsys.readouterr()
    code = racs.main(["process", "-c", str(field["parset"]), "--postage-stamps", "false", str(image)])
    err = capsys.readouterr().err
    assert code == 0
    assert all("stage %s: reusing" % s in err for s in stages) and ": running (" not in err, err
    summary = json.loads((results / "askap_sim_summary.json").read_text())
    assert summary["stages"] == dict.fromkeys(stages, "reused")
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    assert json.loads((results / racs.STAGE_LEDGER_FILE).read_text()) == ledger
    after = {t: db.count(t) for t in ("images", "sources", "crossmatches", "transients")}
    assert after == before and before["images"] == 1 and before["transients"] == 9


def test_pybdsf_finds_the_bright_injected_sources(field):
    comp = racs.find_sources_pybdsf(field["sim"]["image"], sim_mod.ASKAP_FREQ)
    truth = field["sim"]["truth"]
    bright = truth[truth["kind"].isin(["askap_only", "large_ratio"])]
    idx, _ = racs.crossmatch_nearest(bright["ra"], bright["dec"], comp["ra"], comp["dec"], max_sep=3.0)
    assert (idx >= 0).all()
    assert comp["int_flux"].to_numpy()[idx] == pytest.approx(bright["askap_flux"].to_numpy(), rel=0.15)
    assert comp["pa"].abs().max() <= 360.0            # degrees, not x3600 as in the original


def test_batch_with_manual_catalogues(field, tmp_path):
    """Two images in one run, each with its own existing catalogue via {stem}."""
    shutil.copy(field["sim"]["image"], tmp_path / "imgA.fits")
    shutil.copy(field["sim"]["image"], tmp_path / "imgB.fits")
    comp = racs.read_table(field["results"] / "askap_sim_comp.csv")
    comp.to_csv(tmp_path / "imgA_comp.csv", index=False)
    comp.iloc[::2].to_csv(tmp_path / "imgB_comp.csv", index=False)
    code = racs.main(["process", "-q", "-c", str(field["parset"]), "--askap-csv", str(tmp_path / "{stem}_comp.csv"),
                      "--postage-stamps", "false", "--produce-overlays", "false", "--output-dir", str(tmp_path),
                      "--db-url", "sqlite:///%s" % (tmp_path / "batch.sqlite"),
                      str(tmp_path / "imgA.fits"), str(tmp_path / "imgB.fits")])
    assert code == 0
    db = racs.RacsDatabase("sqlite:///%s" % (tmp_path / "batch.sqlite"))
    images = db.table("images")
    assert sorted(images["name"]) == ["imgA.fits", "imgB.fits"]
    good = comp["flags"] == 0                           # use_all_fits = false keeps flag 0 only
    assert sorted(images["number_askap_sources"]) == sorted([good.sum(), good.iloc[::2].sum()])


# ---------------------------------------------------------------------------
# database: SQLite vs PostgreSQL (+ Q3C)
# ---------------------------------------------------------------------------
def test_sqlite_and_postgresql_give_the_same_rows(field, pg_url):
    import pandas as pd
    master = _master(field)
    askap = racs.read_table(field["results"] / "askap_sim_askap_catalogue.csv")
    row = {"name": "sim.fits", "description": "pg-vs-sqlite", "ra": 0.2, "dec": -35.0, "unique_tag": "x"}
    lite = racs.RacsDatabase("sqlite:///%s" % (field["root"] / "compare.sqlite"))
    pg = racs.RacsDatabase(pg_url)
    assert pg.has_q3c, "the test server should have the q3c extension"
    for db in (lite, pg):
        db.inject(row, askap, master)
        db.inject(row, askap, master)          # same tag again: replaced, not duplicated
    drop = ["id", "image_id", "crossmatch_id"]
    for table in ("sources", "crossmatches", "transients"):
        a = lite.table(table, "sim.fits").drop(columns=drop, errors="ignore")
        b = pg.table(table, "sim.fits").drop(columns=drop, errors="ignore")
        assert len(a) == len(b) > 0
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_dtype=False,
                                      rtol=1e-12)
    assert lite.count("images") == 1 and pg.count("images") >= 1
    # cone search: Q3C in PostgreSQL, declination band + exact distance in SQLite
    centre = master.iloc[0]
    for radius in (30.0, 600.0):
        a = lite.cone_search(centre["ra"], centre["dec"], radius)
        b = pg.cone_search(centre["ra"], centre["dec"], radius)
        b = b[b["image_id"].isin(pg.table("images").query("description == 'pg-vs-sqlite'")["id"])]
        assert list(a["master_name"]) == list(b["master_name"]) and len(a) >= 1
    near_wrap = lite.cone_search(359.999, -35.0, 1800.0)    # crosses RA 0/360
    assert (near_wrap["ra"] < 1).any() and (near_wrap["ra"] > 359).any()


def test_pipeline_writes_to_postgresql(field, pg_url, tmp_path):
    code = racs.main(["process", "-q", "-c", str(field["parset"]), "--postage-stamps", "false",
                      "--produce-overlays", "false", "--output-dir", str(tmp_path), "--db-engine", "postgresql",
                      "--db-url", pg_url, "--db-tag", "pg-run", str(field["sim"]["image"])])
    assert code == 0
    db = racs.RacsDatabase(pg_url)
    images = db.table("images")
    assert (images["description"] == "pg-run").sum() == 1


def test_selavy_catalogue_converted_to_jy(tmp_path):
    selavy = tmp_path / "selavy.csv"
    selavy.write_text("island_id,component_id,ra_deg_cont,dec_deg_cont,flux_peak,flux_peak_err,flux_int,"
                      "flux_int_err,maj_axis,min_axis,pos_ang,rms_image\n"
                      "SB1_island_1,SB1_component_1a,10.0,-40.0,12.0,0.3,15.0,0.5,16.0,13.0,45.0,0.25\n")
    table = racs.read_askap_csv(selavy, "selavy")
    assert table["int_flux"].iloc[0] == pytest.approx(0.015) and table["local_rms"].iloc[0] == pytest.approx(2.5e-4)
    assert table["a"].iloc[0] == 16.0 and table["flags"].iloc[0] == 0


def test_weight_crop_convolution_and_islands_in_the_pipeline(tmp_path):
    """Weight crop -> astropy convolution to the SUMSS beam -> both images source-found."""
    from astropy.io import fits
    sim = sim_mod.simulate_field(tmp_path, size=500, n_faint=20, n_bright=30, n_transients=1, mosaic=False)
    weights = tmp_path / "askap_sim.weights.fits"
    w = np.ones((500, 500), np.float32)
    w[:, :60] = 0.0
    fits.PrimaryHDU(w).writeto(weights)
    islands = tmp_path / "islands.csv"
    islands.write_text("island,components\n1,4\n")
    code = racs.main(["process", "-q", "--nice", "0", "--sumss-csv", str(sim["sumss_csv"]),
                      "--nvss-csv", str(sim["nvss_csv"]), "--weight-crop", "--weight-crop-image",
                      str(tmp_path / "{stem}.weights.fits"), "--convolve", "--convolve-method", "astropy",
                      "--askap-islands-csv", str(islands), "--db-inject", "false", "--produce-overlays", "no",
                      "--rms-box", "100", str(sim["image"])])
    assert code == 0
    results = tmp_path / "askap_sim_results"
    cropped = fits.getdata(results / "askap_sim.weightcrop_0.04.fits")
    assert np.isnan(cropped[:, :60]).all()
    conv_header = fits.getheader(results / "askap_sim.convolve2sumss.fits")
    assert conv_header["BMAJ"] * 3600 == pytest.approx(45 / np.sin(np.radians(35.0)), rel=1e-3)
    askap = racs.read_table(results / "askap_sim_askap_catalogue.csv")
    assert {"non_conv_int_flux", "non_conv_d2d"} <= set(askap.columns)
    assert (askap["non_conv_d2d"] < 10).mean() > 0.8
    assert (askap.loc[askap["island"] == 1, "island_size"] == 4).all()
    # fluxes survive the convolution: convolved vs non-convolved integrated flux of bright sources
    bright = askap[(askap["int_flux"] > 0.02) & (askap["non_conv_d2d"] < 5)]
    assert np.median(bright["int_flux"] / bright["non_conv_int_flux"]) == pytest.approx(1.0, abs=0.1)


def _toy_inputs(askap_rows, cat_rows, dec0=-35.0):
    """Tiny prepared ASKAP/SUMSS tables and a stand-in image for transient_search."""
    import pandas as pd
    from types import SimpleNamespace
    askap = pd.DataFrame(askap_rows, columns=["ra", "dec", "int_flux"])
    askap["name"] = ["A%d" % i for i in range(len(askap))]
    askap = askap.assign(err_int_flux=askap["int_flux"] * 0.05, local_rms=2.5e-4, a=15.0, b=12.0,
                         island=np.arange(len(askap)), island_size=1, edge=False,
                         distance_from_centre=0.1)
    cat = pd.DataFrame(cat_rows, columns=["ra", "dec", "flux"])
    cat["name"] = ["S%d" % i for i in range(len(cat))]
    cat = cat.assign(flux_err=cat["flux"] * 0.05, maj=45.0, min=45.0, pa=0.0, mosaic="", beam_maj=78.5,
                     beam_min=45.0, survey_rms=2e-3, askap_local_rms=2.5e-4, edge=False,
                     distance_from_centre=0.1)
    cat["scaled_to_askap"] = racs.scale_flux(cat["flux"], 843e6, 887.5e6)
    cat["scaled_to_askap_err"] = cat["scaled_to_askap"] * 0.05
    image = SimpleNamespace(frequency=887.5e6, beam=(15 / 3600, 12 / 3600, 0.0), rms=2.5e-4)
    opts = racs.flat_options(racs.load_config(racs.CONFIG_SCHEMA))
    return askap, {"sumss": cat}, image, opts


def test_transient_classes_on_a_hand_made_field():
    # A0 matches S0 (ratio ~1); A1 is 5x brighter than S1 (large ratio); S2 has no ASKAP
    # source (predicted 48 mJy at 887.5 MHz = 190 sigma); A2 (40 mJy) has no catalogue
    # source; A3 (0.5 mJy) is too faint for SUMSS; A4 lies north of SUMSS's -30 deg limit.
    s0 = float(racs.scale_flux(0.020, 843e6, 887.5e6))        # 20 mJy SUMSS -> 19.194 mJy
    askap, cats, image, opts = _toy_inputs(
        [(10.0, -35.0, s0), (10.1, -35.0, 5 * s0), (10.3, -35.0, 0.040), (10.4, -35.0, 5e-4),
         (10.5, -29.5, 0.040)],
        [(10.0, -35.0 + 2 / 3600, 0.020), (10.1, -35.0, 0.020), (10.2, -35.0, 0.050)])
    master = racs.transient_search(askap, cats, image, opts).set_index("master_name")
    assert master.loc["S0", "transient_type"] == "match" and not master.loc["S0", "candidate"]
    assert master.loc["S0", "ratio"] == pytest.approx(1.0, rel=1e-9)
    assert master.loc["S1", "transient_class"] == "large_ratio" and master.loc["S1", "candidate"]
    assert master.loc["S1", "ratio"] == pytest.approx(5.0, rel=1e-6)
    assert master.loc["S2", "transient_class"] == "catalogue_only" and master.loc["S2", "candidate"]
    assert master.loc["S2", "predicted_snr"] == pytest.approx(0.05 * (887.5 / 843) ** -0.8 / 2.5e-4)
    assert master.loc["S2", "aegean_rms_used"]                 # no forced fit: 3 sigma limit
    assert master.loc["A2", "transient_class"] == "askap_only" and master.loc["A2", "candidate"]
    assert "A3" not in master.index and "A4" not in master.index
    # a missing source next to a bright source is most likely a sidelobe artefact
    bright = Path(__import__("tempfile").mkdtemp()) / "bright.csv"
    bright.write_text("name;ra;dec;flux\nBRIGHT;10.2;-35.1;5.0\n")
    opts_bright = dict(opts, bright_sources_csv=bright)
    tagged = racs.transient_search(askap, cats, image, opts_bright).set_index("master_name")
    assert tagged.loc["S2", "pipelinetag"] == "Likely artefact (bright source)"
    assert not tagged.loc["S2", "candidate"] and tagged.loc["A2", "candidate"]
    shutil.rmtree(bright.parent)
    # a high local rms makes the missing source unverifiable
    cats["sumss"]["askap_local_rms"] = 0.02
    master = racs.transient_search(askap, cats, image, opts).set_index("master_name")
    assert master.loc["S2", "pipelinetag"] == "Local RMS too high" and not master.loc["S2", "candidate"]


def test_convolved_mode_uses_the_non_convolved_catalogue():
    askap, cats, image, opts = _toy_inputs([(10.0, -35.0, 0.019), (10.3, -35.0, 0.040)],
                                           [(10.0, -35.0, 0.020), (10.2, -35.0, 0.050)])
    non_conv = askap.iloc[[0]].copy()
    non_conv = __import__("pandas").concat([non_conv, non_conv.assign(ra=10.2 + 10 / 3600, name="N1",
                                                                      int_flux=0.048)], ignore_index=True)
    # the convolved "new" source A1 has no non-convolved counterpart: created by convolution
    askap["non_conv_d2d"] = [0.5, 200.0]
    askap["non_conv_int_flux"] = [0.019, np.nan]
    master = racs.transient_search(askap, cats, image, opts, non_conv=non_conv).set_index("master_name")
    assert master.loc["S1", "transient_type"] == "match" and master.loc["S1", "using_preconv"]
    assert master.loc["S1", "d2d"] == pytest.approx(10 * np.cos(np.radians(35.0)), rel=1e-3)
    assert master.loc["A1", "pipelinetag"] == "Created convolved source" and not master.loc["A1", "candidate"]
