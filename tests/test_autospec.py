"""AutoSpec on simulated MUSE-like cubes (tests/simulate_autospec.py).

Scene: 60 x 60 spaxels x 300 channels (6000-6374 A), Moffat PSF FWHM 0.7", beta 2.8;
IDs 1, 2 bright isolated, 3, 4 faint isolated, 5 + 6 a blended pair 1.0" apart with
emission lines at 6150 and 6300 A.  Tolerances: flux within 5 % of the injected
spectrum inside the extraction's mask (isolated, bright), line peak exact to a channel,
propagated noise within 15 % of the measured scatter.
"""
import shutil

import numpy as np
import pytest

import autospec
import simulate_autospec as sim

APER = [1.0, 2.0]


def _run(tmp, files, **params):
    params.setdefault("APER", APER)
    params.setdefault("PLOTS", False)
    params.setdefault("SIZE", 7.0)
    return autospec.run(DATACUBE=files["cube"], CATALOG=files["catalogue"],
                        OUTPUT=tmp / "out", overwrite=True, progress=False, **params)


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("autospec_scene")
    scene = sim.default_scene()
    files = sim.write_scene(scene, tmp)
    return scene, files, tmp


@pytest.fixture(scope="module")
def default_run(scene_files):
    scene, files, tmp = scene_files
    out = tmp / "default"
    result = _run(out, files, ORIG_FROM="simulator", ORIG_CUBE="sim.fits")
    return scene, files, result


def _source(path):
    from mpdaf.sdetect import Source
    return Source.from_file(str(path))


def _mask_fraction(src, truth, name="MASK_OBJ"):
    mask = src.images[name].data.filled(0).astype(bool)
    image = src.images[name]
    yx = image.wcs.sky2pix([[truth["dec"], truth["ra"]]])[0]
    y0, x0 = int(round(truth["y"] - yx[0])), int(round(truth["x"] - yx[1]))
    return float(truth["profile"][y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask].sum())


def _aperture_fraction(scene, truth, radius):
    yy, xx = np.indices((scene.ny, scene.nx))
    disc = ((yy - truth["y"]) ** 2 + (xx - truth["x"]) ** 2) * scene.pixscale ** 2 <= radius ** 2
    return float(truth["profile"][disc].sum())


def _line_flux(wave, spec, centre, half=6.0, side=10.0):
    core = np.abs(wave - centre) <= half
    band = (np.abs(wave - centre) > half + 2) & (np.abs(wave - centre) <= half + 2 + side)
    return float(np.nansum(spec[core] - np.nanmedian(spec[band])))


# ---------------------------------------------------------------------------
# Pure functions, against independent implementations
# ---------------------------------------------------------------------------
def test_continuum_fit_matches_polyfit_per_spaxel():
    rng = np.random.default_rng(0)
    x = np.arange(200)
    cube = rng.normal(size=(200, 3, 4)) + (1e-4 * (x - 80) ** 2)[:, None, None]
    fitted = autospec.continuum_fit(cube, 3)
    for j in range(3):
        for i in range(4):
            coef = np.polyfit(x, cube[:, j, i], 3)
            assert np.allclose(fitted[:, j, i], np.polyval(coef, x), atol=1e-8)


def test_optimal_extraction_matches_mpdaf_compute_optimal_spectrum():
    from mpdaf.obj import Cube
    from mpdaf.sdetect.sea import compute_optimal_spectrum
    rng = np.random.default_rng(1)
    data = rng.normal(5, 1, (20, 5, 5))
    var = rng.uniform(0.5, 2.0, (20, 5, 5))
    prof = np.exp(-0.5 * ((np.indices((5, 5)) - 2.0) ** 2).sum(axis=0))
    mask = prof > 0.1
    ref = compute_optimal_spectrum(Cube(data=data, var=var), mask, prof.copy())
    weights = np.where(mask, prof, 0).ravel()
    flux, fvar = autospec.optimal_extraction(data.reshape(20, -1), var.reshape(20, -1),
                                             weights / weights.sum())
    assert np.allclose(flux, ref.data) and np.allclose(fvar, ref.var)


def test_weighted_extraction_hand_worked():
    data = np.array([[1.0, 3.0], [2.0, 2.0]])      # 2 channels x 2 spaxels
    var = np.ones_like(data)
    flux, fvar = autospec.weighted_extraction(data, var, np.array([0.25, 0.75]))
    # F = sum(P D) / sum(P^2) = (0.25 + 2.25) / 0.625 = 4; var = sum(P^2) / sum(P^2)^2 = 1.6
    assert np.allclose(flux, [4.0, 3.2]) and np.allclose(fvar, [1.6, 1.6])


def test_combine_masks_empty_intersection_falls_back_to_union():
    a = np.zeros((5, 5), bool)
    b = np.zeros((5, 5), bool)
    a[0, 0], b[4, 4] = True, True
    mask, used, union, inter = autospec.combine_masks({"A": a, "B": b, "C": np.zeros_like(a)},
                                                      "intersection")
    assert used == "union (empty intersection)" and mask.sum() == 2 and not inter.any()
    mask, used, _, _ = autospec.combine_masks({"A": a}, "union")
    assert used == "union" and mask.sum() == 1
    assert autospec.combine_masks({"A": np.zeros_like(a)}, "union")[0] is None


def test_circular_mask_non_square_stamp():
    disc = autospec.circular_mask((5, 9), (2.0, 6.0), 0.4, (0.2, 0.2))
    assert disc.sum() == 13 and disc[2, 6] and not disc[2, 2]


# ---------------------------------------------------------------------------
# Extraction accuracy on the simulated cube
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("ident", [1, 2])
def test_isolated_extractions_recover_injected_flux_and_line(default_run, ident):
    scene, _, result = default_run
    row = next(r for r in result["rows"] if r["ID"] == ident)
    assert row["STATUS"] == "ok" and row["MASK_USED"] == "intersection"
    src, truth = _source(row["FILE"]), scene.truth[ident]
    wave = scene.wave
    in_mask = truth["spectrum"] * _mask_fraction(src, truth)
    expected = {"MUSE_TOT_SKYSUB": in_mask, "MUSE_WHITE_SKYSUB": in_mask,
                "MUSE_OPTIMAL_SKYSUB": in_mask,
                "CROSS_CORRELATION_SKYSUB": truth["spectrum"] * _mask_fraction(src, truth, "MASK_XCOR"),
                "MUSE_APER_2.0_SKYSUB": truth["spectrum"] * _aperture_fraction(scene, truth, 2.0),
                "MUSE_APER_1.0_SKYSUB": truth["spectrum"] * _aperture_fraction(scene, truth, 1.0)}
    line = truth["galaxy"].lines[0][0]
    for name, true in expected.items():
        spec = src.spectra[name].data.filled(np.nan)
        assert np.nansum(spec) == pytest.approx(true.sum(), rel=0.05), name
        window = np.abs(wave - line) < 15
        assert wave[window][np.argmax(spec[window])] == wave[window][np.argmax(true[window])], name


def test_propagated_variance_matches_scatter(default_run):
    scene, _, result = default_run
    row = next(r for r in result["rows"] if r["ID"] == 3)
    src, truth = _source(row["FILE"]), scene.truth[3]
    for name, frac in (("MUSE_TOT_SKYSUB", _mask_fraction(src, truth)),
                       ("MUSE_APER_1.0_SKYSUB", _aperture_fraction(scene, truth, 1.0))):
        spec = src.spectra[name]
        resid = (spec.data.filled(np.nan) - truth["spectrum"] * frac) / np.sqrt(spec.var.filled(np.nan))
        assert np.nanstd(resid) == pytest.approx(1.0, abs=0.15), name


@pytest.mark.parametrize("ident", [3, 4])
def test_weighted_and_optimal_beat_aperture_on_faint_sources(default_run, ident):
    _, _, result = default_run
    row = next(r for r in result["rows"] if r["ID"] == ident)
    for name in ("MUSE_WHITE_SKYSUB", "MUSE_OPTIMAL_SKYSUB"):
        for aper in ("MUSE_APER_1.0_SKYSUB", "MUSE_APER_2.0_SKYSUB"):
            assert row["SN_" + name] > row["SN_" + aper], (name, aper)


def test_xcor_contsub_reduces_blend_contamination(scene_files):
    """Blended pair 5 + 6 (0.8" apart) share one segment: the neighbour's line (6300 A) in object 5.

    Deblending is switched off (DEBLEND_CONT = 1) so that the pair shares one segment.
    Contamination c = F(6300 A) / F(6150 A) in object 5's spectrum.  With REF = 1.0"
    aperture and 3 iterations, continuum-subtracted cross-correlation cuts c by >= 3x
    relative to the white-light-weighted spectrum of the shared mask (measured 0.74 -> 0.19, 3.9x)
    and by >= 1.5x relative to its own reference spectrum (0.35 -> 0.19, 1.9x), while
    keeping >= 50 % of the object's own line.
    """
    scene, files, tmp = scene_files
    result = _run(tmp / "blend", files, REF="1.0", XCOR_ITER=3, DEBLEND_CONT=1.0, SPLIT_SHARED=False)
    assert result["rows"][4]["MASK_OBJ_NPIX"] == result["rows"][5]["MASK_OBJ_NPIX"]  # shared
    assert "shared_segment" in result["rows"][4]["FLAGS"] and result["rows"][4]["SHARED_SEGMENT"] == "6"
    row = next(r for r in result["rows"] if r["ID"] == 5)
    src, wave = _source(row["FILE"]), scene.wave

    def contamination(name):
        spec = src.spectra[name].data.filled(np.nan)
        return _line_flux(wave, spec, 6300.0) / _line_flux(wave, spec, 6150.0)

    white = contamination("MUSE_WHITE_SKYSUB")
    ref = contamination("MUSE_APER_1.0_SKYSUB")
    xcor = contamination("CROSS_CORRELATION_ITER_SKYSUB")
    assert row["FINAL_SPECTRUM"] == "CROSS_CORRELATION_ITER_SKYSUB"
    assert white / xcor >= 3.0 and ref / xcor >= 1.5, (white, ref, xcor)
    own = _line_flux(wave, src.spectra["CROSS_CORRELATION_ITER_SKYSUB"].data.filled(np.nan), 6150.0)
    true_own = _line_flux(wave, scene.truth[5]["spectrum"], 6150.0)
    assert own >= 0.5 * true_own


# ---------------------------------------------------------------------------
# Outputs: Source files, summary, MARZ, plots
# ---------------------------------------------------------------------------
def test_source_files_contents_and_summary(default_run):
    _, _, result = default_run
    assert result["n_ok"] + result["n_fallback"] + result["n_flagged"] == 6 and result["n_failed"] == 0
    flagged = {r["ID"]: r["FLAGS"] for r in result["rows"] if r["FLAGS"]}
    assert set(flagged) <= {4, 5, 6}, flagged      # 4 fallback mask; 5 + 6 share a segment
    from astropy.table import Table
    table = Table.read(str(result["summary"]))
    assert list(table["ID"]) == [1, 2, 3, 4, 5, 6]
    for row in result["rows"]:
        src = _source(row["FILE"])
        assert src.header["ID"] == row["ID"] and src.header["FROM"] == "simulator"
        assert src.header["CUBE"] == "sim.fits" and src.header["EXT"] == "AutoSpec"
        for name in ("MUSE_SKY", "MUSE_TOT_SKYSUB", "MUSE_WHITE_SKYSUB", "MUSE_OPTIMAL_SKYSUB",
                     "MUSE_APER_1.0_SKYSUB", "MUSE_APER_2.0_SKYSUB", "CROSS_CORRELATION_SKYSUB",
                     "CROSS_CORRELATION_CONTSUB_SKYSUB", "CROSS_CORRELATION_ITER_SKYSUB",
                     "MUSE_WHITE_CONTSUB_SKYSUB"):
            assert name in src.spectra, name
            if name == "MUSE_WHITE_CONTSUB_SKYSUB":
                continue                     # continuum-free reference: no S/N column
            assert src.spectra[name].var is not None
            snr = autospec.integrated_snr(src.spectra[name].data.filled(np.nan),
                                          src.spectra[name].var.filled(np.nan))
            assert table[table["ID"] == row["ID"]]["SN_" + name][0] == pytest.approx(snr, rel=1e-4)
        for name in ("MUSE_WHITE", "SEG_MUSE_WHITE", "MASK_OBJ", "MASK_SKY", "MASK_XCOR",
                     "CROSS_CORRELATION", "CROSS_CORRELATION_CONTSUB"):
            assert name in src.images, name
        assert not src.cubes
        assert int(src.images["MASK_OBJ"].data.sum()) == row["MASK_OBJ_NPIX"]
    fallback = next(r for r in result["rows"] if r["ID"] == 4)
    assert fallback["STATUS"] == "fallback" and "SEG_MUSE_WHITE" in fallback["REASON"]


def test_marz_file(default_run):
    from astropy.io import fits
    scene, _, result = default_run
    with fits.open(result["marz"]) as hdul:
        assert hdul[0].data.shape == (6, scene.nwave)
        assert hdul["VARIANCE"].data.shape == (6, scene.nwave)
        assert np.allclose(hdul["WAVELENGTH"].data, scene.wave)
        assert list(hdul["FIBRES"].data["NAME"]) == ["1", "2", "3", "4", "5", "6"]


def test_provenance_beside_the_products(default_run):
    """autospec_run.json (the shared write_provenance): tool, version, command line and the
    resolved configuration of the run."""
    import json
    _, files, result = default_run
    info = json.loads((result["summary"].parent / "autospec_run.json").read_text())
    assert info["tool"] == "autospec" and info["version"] == autospec.__version__
    assert {"argv", "cwd", "date", "python"} <= set(info)
    assert info["config"]["autospec"]["APER"] == APER and info["config"]["autospec"]["ORIG_FROM"] == "simulator"
    assert info["config"]["autospec"]["DATACUBE"] == str(files["cube"])


def test_out_flags_single_row_catalogue_plots_and_narrow_band(scene_files, tmp_path):
    scene, files, _ = scene_files
    cat = tmp_path / "one.txt"
    truth = scene.truth[1]
    cat.write_text("%d %.8f %.8f 99 extra columns\n" % (1, truth["ra"], truth["dec"]))
    result = autospec.run(DATACUBE=files["cube"], CATALOG=cat, OUTPUT=tmp_path / "out",
                          OUT_SUB=True, OUT_SEG=False, OUT_SPEC=False, PLOTS=True,
                          NB_RANGES=["6095-6105"], progress=False)
    assert result["n_ok"] == 1
    src = _source(result["rows"][0]["FILE"])
    assert {"MUSE", "MUSE_CONTSUB"} <= set(src.cubes) and not any(k.startswith("SEG_") for k in src.images)
    assert set(src.spectra) == {"MUSE_WHITE_SKYSUB", "CROSS_CORRELATION_SKYSUB",
                                "CROSS_CORRELATION_CONTSUB_SKYSUB", "CROSS_CORRELATION_ITER_SKYSUB"}
    nb = src.images["NB_6095_6105"].data
    peak = np.unravel_index(np.argmax(nb), nb.shape)
    centre = src.images["MASK_OBJ"].wcs.sky2pix([[truth["dec"], truth["ra"]]])[0]
    assert np.all(np.abs(np.array(peak) - centre) <= 1.0)
    images = tmp_path / "out" / "images" / "1"
    assert sorted(p.name for p in images.iterdir()) == ["1_IMAGES.jpg", "1_MASKS.jpg",
                                                       "1_SPECTRA.jpg", "1_XCOR.jpg"]


# ---------------------------------------------------------------------------
# Modes, masks, segmentation input, cube forms
# ---------------------------------------------------------------------------
def test_cat_mode_per_row_size_and_ref(scene_files, tmp_path):
    scene, files, _ = scene_files
    t = scene.truth
    cat = tmp_path / "cat.txt"
    cat.write_text("# ID RA DEC SIZE REF\n"
                   "1 %.8f %.8f 4.0 2.0\n2 %.8f %.8f\n3 %.8f %.8f 5.0 nosuchimage\n"
                   % (t[1]["ra"], t[1]["dec"], t[2]["ra"], t[2]["dec"], t[3]["ra"], t[3]["dec"]))
    with pytest.raises(autospec.InputError, match=r"line 4 \(ID 3\), column 5 \(REF\): REF "
                                                  r"'nosuchimage' names no IMG image"):
        autospec.run(DATACUBE=files["cube"], CATALOG=cat, MODE="cat", APER=[1.0],
                     OUTPUT=tmp_path / "bad", PLOTS=False, progress=False)
    assert not (tmp_path / "bad").exists()
    cat.write_text("\n".join(cat.read_text().splitlines()[:3]) + "\n")
    result = autospec.run(DATACUBE=files["cube"], CATALOG=cat, MODE="cat", APER=[1.0],
                          OUTPUT=tmp_path / "out", PLOTS=False, progress=False)
    rows = {r["ID"]: r for r in result["rows"]}
    assert rows[1]["REF_SPECTRUM"] == "MUSE_APER_2.0_SKYSUB" and rows[1]["SIZE"] == 4.0
    src = _source(rows[1]["FILE"])
    assert src.images["MUSE_WHITE"].shape == (21, 21) and "MASK_APER_2.0_OBJ" in src.images
    assert rows[2]["REF_SPECTRUM"] == "MUSE_WHITE_SKYSUB" and rows[2]["SIZE"] == 5.0


def test_seg_input_union_and_use_imgs_false(scene_files, tmp_path):
    scene, files, _ = scene_files
    seg = sim.write_segmentation(scene, tmp_path / "seg.fits", ids={1, 2, 3, 5, 6})
    img = sim.write_image(scene, tmp_path / "hst.fits")
    result = autospec.run(DATACUBE=files["cube"], CATALOG=files["catalogue"], APER=[1.0],
                          SEG=[seg], IMG=[img], OBJ_MASK="union", OUTPUT=tmp_path / "u",
                          PLOTS=False, progress=False)
    rows = {r["ID"]: r for r in result["rows"]}
    assert rows[1]["MASK_USED"] == "union" and rows[1]["MASK_OBJ_NPIX"] == rows[1]["MASK_UNION_NPIX"]
    assert rows[1]["MASK_UNION_NPIX"] >= rows[1]["MASK_INTER_NPIX"] > 0
    src = _source(rows[1]["FILE"])
    assert {"SEG_SEG", "SEG_HST", "SEG_MUSE_WHITE", "HST"} <= set(src.images)
    assert "HST_SKYSUB" in src.spectra and rows[1]["SN_HST_SKYSUB"] > rows[1]["SN_MUSE_APER_1.0_SKYSUB"]
    only_seg = autospec.run(DATACUBE=files["cube"], CATALOG=files["catalogue"], APER=[1.0],
                            SEG=[seg], USE_IMGS=False, OUTPUT=tmp_path / "s", PLOTS=False,
                            progress=False)
    rows = {r["ID"]: r for r in only_seg["rows"]}
    truth_mask = _source(rows[1]["FILE"]).images["SEG_SEG"].data.filled(0) == 1
    assert rows[1]["MASK_OBJ_NPIX"] == truth_mask.sum()
    assert rows[4]["STATUS"] == "fallback" and rows[4]["EMPTY_SEG"] == "SEG_SEG"


@pytest.mark.parametrize("form, ext", [("primary", ["0", "1"]), ("named", ["SCI", "ERRV"])])
def test_data_ext_forms_give_the_same_spectra(default_run, tmp_path, form, ext):
    scene, files, result = default_run
    path = tmp_path / "cube.fits"
    from astropy.io import fits
    with fits.open(files["cube"]) as hdul:
        data, var = hdul["DATA"].data, hdul["STAT"].data
    sim.write_cube(scene, path, form, data, var)
    other = _run(tmp_path, {"cube": path, "catalogue": files["catalogue"]}, DATA_EXT=ext,
                 MARZ="")
    first = _source(result["rows"][0]["FILE"])
    again = _source(other["rows"][0]["FILE"])
    assert "CUBE_WHITE_SKYSUB" in again.spectra          # no INSTRUME: generic prefix
    assert np.allclose(again.spectra["CUBE_OPTIMAL_SKYSUB"].data, first.spectra["MUSE_OPTIMAL_SKYSUB"].data)


def test_cube_without_variance_warns_and_estimates(scene_files, tmp_path):
    scene, files, _ = scene_files
    from astropy.io import fits
    with fits.open(files["cube"]) as hdul:
        data = hdul["DATA"].data
    sim.write_cube(scene, tmp_path / "novar.fits", "novar", data, None)
    with pytest.warns(autospec.NoVarianceWarning, match="no variance"):
        result = autospec.run(DATACUBE=tmp_path / "novar.fits", CATALOG=files["catalogue"],
                              APER=[1.0], OUTPUT=tmp_path / "out", PLOTS=False, progress=False)
    assert result["n_ok"] + result["n_fallback"] + result["n_flagged"] == 6
    assert all(r["VAR_ESTIMATED"] and "estimated_variance" in r["FLAGS"] for r in result["rows"])
    sky = _source(result["rows"][0]["FILE"]).spectra["MUSE_TOT_SKYSUB"]
    assert np.isfinite(sky.var.data).all() and (sky.var.data > 0).all()


# ---------------------------------------------------------------------------
# Bad input, CLI, re-runs, parallel
# ---------------------------------------------------------------------------
def test_positions_outside_cube_are_marked_and_run_continues(scene_files, tmp_path):
    scene, files, _ = scene_files
    cat = sim.write_catalogue(scene, tmp_path / "cat.txt",
                              extra_rows=["99 %.6f %.6f" % (sim.RA0 + 0.05, sim.DEC0)])
    with pytest.warns(autospec.OutsideCubeWarning, match="IDs \\[99\\]"):
        result = autospec.run(DATACUBE=files["cube"], CATALOG=cat, APER=[1.0],
                              OUTPUT=tmp_path / "out", PLOTS=False, progress=False)
    rows = {r["ID"]: r for r in result["rows"]}
    assert rows[99]["STATUS"] == "outside" and "outside the cube" in rows[99]["REASON"]
    assert rows[1]["STATUS"] == "ok" and result["n_outside"] == 1


def test_missing_img_file_and_bad_ref_are_config_errors(scene_files, tmp_path):
    _, files, _ = scene_files
    with pytest.raises(autospec.ConfigError, match="IMG file .*nope.fits does not exist"):
        autospec.run(DATACUBE=files["cube"], CATALOG=files["catalogue"], IMG=["nope.fits"],
                     OUTPUT=tmp_path / "out", progress=False)
    with pytest.raises(autospec.ConfigError, match="REF = '3.0' is an aperture radius that is not in APER"):
        autospec.run(DATACUBE=files["cube"], CATALOG=files["catalogue"], REF="3.0", APER=[1.0],
                     OUTPUT=tmp_path / "out", progress=False)


def test_cli_param_file_rerun_skips_and_overwrite(scene_files, tmp_path, monkeypatch, capsys):
    _, files, _ = scene_files
    shutil.copy(files["cube"], tmp_path / "cube.fits")
    shutil.copy(files["catalogue"], tmp_path / "catalogue.txt")
    (tmp_path / "param.py").write_text(
        "MODE = 'param'\nDATACUBE = 'cube.fits'\nCATALOG = 'catalogue.txt'\nAPER = 1.0\n"
        "OBJ_MASK = 'INTER'\nPLOTS = False\nOUTPUT = 'output'\nPRE_OUT = 'Source_'\n")
    monkeypatch.chdir(tmp_path)
    assert autospec.main(["-q", "--no-progress"]) == 0
    first = (tmp_path / "output" / "Source_1.fits").stat().st_mtime_ns
    logs = list((tmp_path / "output" / "logs").glob("*.log"))
    assert len(logs) == 1 and logs[0].read_text().startswith("# Log file: ")
    assert "1: Extracted Successfully in" in logs[0].read_text()
    assert autospec.main(["-q", "--no-progress"]) == 0          # everything skipped
    assert (tmp_path / "output" / "Source_1.fits").stat().st_mtime_ns == first
    from astropy.table import Table
    table = Table.read(str(tmp_path / "output" / "summary.ecsv"))
    assert all(str(r).startswith("skipped") for r in table["REASON"]) and len(table) == 6
    assert list(table["STATUS"]) == ["ok", "ok", "ok", "fallback", "ok", "ok"]
    assert autospec.main(["-q", "--no-progress", "--overwrite", "--nproc", "2"]) == 0
    assert (tmp_path / "output" / "Source_1.fits").stat().st_mtime_ns > first
    assert not list((tmp_path / "output").glob(".*part*"))
    (tmp_path / "param.py").write_text("APER = 'big'\n")
    assert autospec.main(["-q"]) == 2
    assert "APER = 'big' is invalid" in capsys.readouterr().err


def test_parallel_run_matches_serial(default_run, tmp_path):
    _, files, serial = default_run
    parallel = _run(tmp_path / "p", files, nproc=2)
    for a, b in zip(serial["rows"], parallel["rows"]):
        assert a["ID"] == b["ID"] and a["STATUS"] == b["STATUS"]
        assert a["SN_CROSS_CORRELATION_ITER_SKYSUB"] == pytest.approx(
            b["SN_CROSS_CORRELATION_ITER_SKYSUB"], rel=1e-6)


def test_fast_source_writer_matches_mpdaf_source_write(default_run, tmp_path):
    """The direct FITS writer gives what mpdaf's own Source.write gives (independent path)."""
    from astropy.io import fits
    scene, files, result = default_run
    params = autospec.load_autospec_config(overrides={
        ("autospec", "DATACUBE"): str(files["cube"]), ("autospec", "CATALOG"): str(files["catalogue"]),
        ("autospec", "APER"): APER, ("autospec", "SIZE"): 7.0,
        ("autospec", "OUTPUT"): str(tmp_path)})["autospec"]
    state = autospec.build_state(params)
    row = autospec.read_catalogue(files["catalogue"], size=7.0)[0]
    obj = autospec.extract_object(state, row)
    autospec.build_source(state, row, obj).write(str(tmp_path / "mpdaf.fits"))
    state.writer.write(tmp_path / "fast.fits", row, obj, state.cube)
    with fits.open(tmp_path / "fast.fits") as hdul:
        hdul.verify("exception")
    slow, fast = _source(tmp_path / "mpdaf.fits"), _source(tmp_path / "fast.fits")
    assert set(slow.spectra) == set(fast.spectra) and set(slow.images) == set(fast.images)
    for name in slow.spectra:
        assert np.allclose(slow.spectra[name].data, fast.spectra[name].data, rtol=1e-6)
        assert np.allclose(slow.spectra[name].var, fast.spectra[name].var, rtol=1e-6)
        assert slow.spectra[name].wave.isEqual(fast.spectra[name].wave)
    for name in slow.images:
        assert slow.images[name].wcs.isEqual(fast.images[name].wcs), name
        assert np.allclose(slow.images[name].data, fast.images[name].data, rtol=1e-6), name
    for key in ("ID", "RA", "DEC", "FROM", "CUBE", "EXT", "REFSPEC"):
        assert slow.header[key] == fast.header[key], key


def test_table_catalogue_muselet_style(scene_files, tmp_path):
    from astropy.table import Table
    scene, files, _ = scene_files
    table = Table({"ID": [1, 2], "RA": [scene.truth[1]["ra"], scene.truth[2]["ra"]],
                   "DEC": [scene.truth[1]["dec"], scene.truth[2]["dec"]], "FLUX": [1.0, 2.0]})
    table.write(tmp_path / "muselet.ecsv")
    rows = autospec.read_catalogue(tmp_path / "muselet.ecsv")
    assert [r.ID for r in rows] == [1, 2] and rows[0].SIZE == 5.0
    with pytest.raises(autospec.InputError, match="line 2: expected ID RA DEC"):
        (tmp_path / "bad.txt").write_text("1 150.1 2.2\nx y\n")
        autospec.read_catalogue(tmp_path / "bad.txt")


def test_run_demo(tmp_path):
    summary = sim.run_demo(tmp_path)
    assert summary["n_objects"] == 6 and (tmp_path / "autospec_demo.png").stat().st_size > 10000
    assert summary["status"][1] == "ok"
    assert summary["white_flux_ratio"][1] == pytest.approx(1.0, abs=0.05)


def test_extended_line_emission_in_the_sky_region_simulated_truth(tmp_path):
    """Simulated truth: galaxy 1 (line 6100 A, known flux) inside a ring of extended 6100 A
    emission 1.2-3" from it, too faint in white light to be segmented (a filament).  The
    original's local sky (mean of the segment-free stamp spaxels) takes the ring for sky and
    keeps ~20 % of the line (measured 0.20); the default annulus sky leaves out the
    line-emitting spaxels (5-channel S/N > 5 each) and keeps it within 25 % (measured 0.88).
    A ring too faint to see per spaxel (amplitude 3) cannot be left out - those runs are
    flagged sky_lines (measured 0.31-0.52)."""
    scene = sim.default_scene()
    model, data, var = sim.render(scene)
    gal = scene.truth[1]
    yy, xx = np.mgrid[0:scene.ny, 0:scene.nx]
    ring = np.hypot(yy - gal["y"], xx - gal["x"]) * scene.pixscale
    ring = ((ring > 1.2) & (ring < 3.0)).astype(np.float32)
    sel = np.abs(scene.wave - 6100.0) < 6
    side = (np.abs(scene.wave - 6100.0) > 15) & (np.abs(scene.wave - 6100.0) < 40)
    truth = (gal["spectrum"][sel] - np.median(gal["spectrum"][side])).sum()
    cat = sim.write_catalogue(scene, tmp_path / "cat.txt")
    fluxes = {}
    for amp in (6.0, 3.0):
        line = amp * np.exp(-0.5 * ((scene.wave - 6100.0) / 2.0) ** 2)
        cube = sim.write_cube(scene, tmp_path / ("ring%g.fits" % amp), "muse",
                              data + (line[:, None, None] * ring[None]).astype(np.float32), var)
        for method in ("local", "annulus"):
            res = autospec.run(DATACUBE=cube, CATALOG=cat, OUTPUT=tmp_path / ("%s%g" % (method, amp)), APER=[1.0],
                               SIZE=7.0, PLOTS=False, SKY_METHOD=method, progress=False)
            row = res["rows"][0]
            spec = _source(row["FILE"]).spectra["MUSE_TOT_SKYSUB"].data.filled(np.nan)
            fluxes[method, amp] = ((spec[sel] - np.nanmedian(spec[side])).sum() / truth, row["FLAGS"])
    assert fluxes["local", 6.0][0] < 0.5 and "sky_lines" in fluxes["local", 6.0][1], fluxes
    assert abs(fluxes["annulus", 6.0][0] - 1) < 0.25, fluxes
    assert "sky_lines" in fluxes["annulus", 3.0][1] and "sky_lines" in fluxes["local", 3.0][1], fluxes


# ---------------------------------------------------------------------------
# The EXTRACTIONS registry drives the extractions
# ---------------------------------------------------------------------------
def _family(name):
    """The EXTRACTIONS entry a spectrum belongs to, from its name (written out by hand)."""
    base = name[:-len("_SKYSUB")] if name.endswith("_SKYSUB") else name
    if base.startswith("CROSS_CORRELATION") or base.endswith("_CONTSUB"):
        return "XCOR"
    if base.startswith("MUSE_APER_"):
        return "APER"
    return {"MUSE_SKY": "SKY", "MUSE_TOT": "TOT", "MUSE_WHITE": "WEIGHTED", "HST": "WEIGHTED",
            "MUSE_NB": "NB", "MUSE_OPTIMAL": "OPTIMAL", "MUSE_PSF": "PSF"}[base]


@pytest.fixture(scope="module")
def everything_on(scene_files):
    """Galaxy 1 of a cube with FSF keywords, one IMG image, NB_SEGMENT at its 6100 A line."""
    scene, files, tmp = scene_files
    out = tmp / "everything"
    out.mkdir()
    cube = sim.write_cube(scene, out / "fsf.fits", fsf=True)
    img = sim.write_image(scene, out / "hst.fits")
    cat = out / "one.txt"
    cat.write_text("1 %.8f %.8f\n" % (scene.truth[1]["ra"], scene.truth[1]["dec"]))
    params = dict(DATACUBE=cube, CATALOG=cat, IMG=[img], NB_SEGMENT="6100", APER=APER, SIZE=7.0,
                  PLOTS=False, OUTPUT=out / "out")
    return scene, params


def test_extractions_registry_gives_the_spectra_in_its_order(everything_on):
    """Every entry of EXTRACTIONS makes spectra, and the Source file lists them in the
    registry's order; the summary table's metadata describes the same entries."""
    from astropy.io import fits
    from astropy.table import Table
    _, params = everything_on
    result = autospec.run(progress=False, overwrite=True, **params)
    assert result["rows"][0]["STATUS"] in ("ok", "flagged"), result["rows"][0]
    with fits.open(result["rows"][0]["FILE"]) as hdul:
        names = [h.name[4:-5] for h in hdul if h.name.startswith("SPE_") and h.name.endswith("_DATA")]
    assert {"MUSE_PSF_SKYSUB", "MUSE_NB_SKYSUB", "HST_SKYSUB", "MUSE_SKY"} <= set(names), names
    families = list(dict.fromkeys(_family(n) for n in names))
    assert families == list(autospec.EXTRACTIONS)
    assert [_family(n) for n in names] == sorted((_family(n) for n in names), key=list(autospec.EXTRACTIONS).index)
    meta = Table.read(str(result["summary"])).meta["extractions"]
    assert list(meta) == list(autospec.EXTRACTIONS)


def test_extractions_registry_entries_add_and_remove_extractions(everything_on, monkeypatch, tmp_path):
    """Adding an entry adds its spectrum (to the result, the Source file and the summary S/N);
    removing one removes its spectra."""
    _, params = everything_on
    cfg = autospec.load_autospec_config(overrides={("autospec", k): v for k, v in params.items()})
    cfg["autospec"]["OUTPUT"] = tmp_path            # not the other test's products
    state = autospec.build_state(cfg["autospec"])
    row = autospec.read_catalogue(params["CATALOG"], size=7.0)[0]

    def mean_spaxel(ctx):
        flat = ctx.mask.ravel()
        npix = flat.sum()
        var = ctx.var[:, flat].sum(axis=1) / npix ** 2 + ctx.sky_var
        return {ctx.prefix + "_MEAN" + ctx.suffix: (ctx.data[:, flat].mean(axis=1), var)}

    monkeypatch.setitem(autospec.EXTRACTIONS, "MEAN", autospec.Extraction(mean_spaxel, "<P>_MEAN", "mean spaxel"))
    monkeypatch.delitem(autospec.EXTRACTIONS, "OPTIMAL")
    obj = autospec.extract_object(state, row)
    assert "MUSE_OPTIMAL_SKYSUB" not in obj.spectra and list(obj.spectra)[-1] == "MUSE_MEAN_SKYSUB"
    assert obj.families["MUSE_MEAN_SKYSUB"] == "MEAN" and obj.families["MUSE_TOT_SKYSUB"] == "TOT"
    assert list(dict.fromkeys(obj.families.values())) == list(autospec.EXTRACTIONS)
    npix = obj.info["MASK_OBJ_NPIX"]                 # the mean spaxel is the mask sum / npix
    assert np.allclose(obj.spectra["MUSE_MEAN_SKYSUB"][0] * npix, obj.spectra["MUSE_TOT_SKYSUB"][0])
    summary, _ = autospec.process_object(state, row)
    assert np.isfinite(summary["SN_MUSE_MEAN_SKYSUB"]) and "SN_MUSE_OPTIMAL_SKYSUB" not in summary
    assert "MUSE_MEAN_SKYSUB" in _source(summary["FILE"]).spectra


# ---------------------------------------------------------------------------
# FITS cards of the fast writer: astropy's images, nothing cut
# ---------------------------------------------------------------------------
def _read_cards(*cards):
    """A primary header made of fits_card images, read by astropy from a FITS file."""
    import io
    from astropy.io import fits
    head = [autospec.fits_card("SIMPLE", True), autospec.fits_card("BITPIX", 8),
            autospec.fits_card("NAXIS", 0), *cards, "END".ljust(80)]
    text = "".join(head)
    assert len(text) % 80 == 0
    with fits.open(io.BytesIO((text + " " * (-len(text) % 2880)).encode("ascii"))) as hdul:
        hdul.verify("exception")
        return hdul[0].header


@pytest.mark.parametrize("key, value, comment", [
    ("OBJECT", "NGC 1068", "name"), ("EMPTY", "", "nothing"), ("EMPTY2", "", ""),
    ("QUOTE", "it's", ""), ("SHORT", "ab", "x"), ("EXACT", "x" * 68, ""),
    ("CRPIX1", 31.0, "Pixel coordinate of reference point"), ("TINY", 1e-05, ""),
    ("BIG", 1.2345e+200, "c"), ("NEG", -0.30000000000000004, ""), ("F32", np.float32(0.1), ""),
    ("F64", np.float64(2.5e-10), "c"), ("NAXIS1", 3681, ""), ("ID", np.int64(-42), "object ID %d"),
    ("BITPIX", -32, "array data type"), ("EXTEND", True, ""), ("VAREST", np.bool_(False), "v"),
    ("lower", 7, ""), ("LONGCOM", 1.5, "c" * 80), ("STRCOM", "value", "c" * 80),
])
def test_fits_card_is_astropys_card_image(key, value, comment):
    import warnings
    from astropy.io import fits
    from astropy.io.fits.verify import VerifyWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VerifyWarning)          # astropy's "comment truncated"
        expected = fits.Card(key, value, comment).image
    assert autospec.fits_card(key, value, comment) == expected
    if key not in ("NAXIS1", "BITPIX"):             # structural: not in a primary header's body
        header = _read_cards(autospec.fits_card(key, value, comment))
        assert header[key] == (float(str(value)) if isinstance(value, np.float32) else value)   # as str() writes it


def test_fits_card_long_string_continues_and_long_key_is_hierarch():
    from astropy.io import fits
    value = "".join("%03d-abcdefg " % i for i in range(10))[:119] + "!"   # FITS drops trailing blanks
    assert len(value) == 120
    card = autospec.fits_card("LONGSTR", value, "a comment")
    assert len(card) == 240 and card[80:88] == "CONTINUE" and card == fits.Card("LONGSTR", value, "a comment").image
    flags = ",".join(autospec.QUALITY_FLAGS)                    # every flag at once: 107 characters
    exact = -1.2345678901234567e-100                            # repr of 24 characters
    header = _read_cards(card, autospec.fits_card("QFLAGS", flags, "autospec quality flags"),
                         autospec.fits_card("VERYLONGKEYWORD", 3.5, "a long key"),
                         autospec.fits_card("ESO DET CHIP NAME", "CCD-44 " * 12 + "end", "HIERARCH + CONTINUE"),
                         autospec.fits_card("EXACT", exact, "all 17 digits"))
    assert header["LONGSTR"] == value and header.comments["LONGSTR"] == "a comment"
    assert header["QFLAGS"] == flags
    assert header["VERYLONGKEYWORD"] == 3.5 and header.comments["VERYLONGKEYWORD"] == "a long key"
    assert header["ESO DET CHIP NAME"] == "CCD-44 " * 12 + "end"
    assert header["EXACT"] == exact                             # astropy's own card keeps 13 digits
    assert autospec.fits_card("VERYLONGKEYWORD", 3.5).startswith("HIERARCH VERYLONGKEYWORD = 3.5")


@pytest.mark.parametrize("key, value, match", [
    ("NANVAL", float("nan"), "NANVAL = nan: FITS headers cannot hold NaN"),
    ("INFVAL", np.float32("inf"), "INFVAL = .*inf"),
    ("TEXT", "caf\xe9", "TEXT = 'caf\xe9': header text must be printable ASCII"),
    ("TAB", "a\tb", "TAB = 'a\\\\tb'"),
    ("NONE", None, "NONE = None: a card holds a bool, int, float or str, not NoneType"),
    ("A" * 70, 1.5, "A{70} = 1.5 cannot be written: keyword and value do not fit"),
    ("HIERARCH B", -1.2345678901234567e-100, "B = -1.2345678901234567e-100 cannot be written"),
    ("HIERARCH KEY", float("nan"), "HIERARCH KEY = nan"),
])
def test_fits_card_refuses_what_fits_cannot_hold_naming_key_and_value(key, value, match):
    with pytest.raises(ValueError, match=match):
        autospec.fits_card(key, value)


# ---------------------------------------------------------------------------
# Sub-cubes (OUT_SUB): the fast writer against mpdaf's own cut-out and writer
# ---------------------------------------------------------------------------
def test_fast_writer_sub_cubes_match_mpdaf(scene_files, tmp_path):
    """The CUB_ extensions of the fast writer hold what mpdaf cuts from the cube file itself
    (``cube[:, y0:y1, x0:x1]``) and writes (``Source.write``): bitwise-equal data and
    variance, the same WCS (world coordinates of the eight corners), the same unit; mpdaf
    reads the file back; the continuum-subtracted sub-cube is the sky-subtracted cut-out
    minus its CONT_POLY Legendre continuum, as mpdaf's Source.write of build_source has it."""
    from astropy.io import fits
    from astropy.wcs import WCS
    from mpdaf.obj import Cube
    from mpdaf.sdetect import Source
    _, files, _ = scene_files
    params = autospec.load_autospec_config(overrides={
        ("autospec", "DATACUBE"): str(files["cube"]), ("autospec", "CATALOG"): str(files["catalogue"]),
        ("autospec", "APER"): APER, ("autospec", "SIZE"): 5.0, ("autospec", "OUT_SUB"): True,
        ("autospec", "OUTPUT"): str(tmp_path)})["autospec"]
    state = autospec.build_state(params)
    row = autospec.read_catalogue(files["catalogue"], size=5.0)[1]
    obj = autospec.extract_object(state, row)
    obj.info["FLAGS"] = ",".join(autospec.QUALITY_FLAGS)      # longer than one card
    fast_path = tmp_path / "fast.fits"
    state.writer.write(fast_path, row, obj, state.cube)
    stamp = obj.subcubes["stamp"]
    full = Cube(str(files["cube"]))
    cut = full[:, stamp.ylo:stamp.yhi, stamp.xlo:stamp.xhi]
    ref = Source.from_data(row.ID, row.RA, row.DEC, ("AutoSpec", autospec.__version__, "cube.fits", ""))
    ref.cubes["MUSE"] = cut
    ref.write(str(tmp_path / "mpdaf_cut.fits"))
    autospec.build_source(state, row, obj).write(str(tmp_path / "mpdaf_build.fits"))
    nwave, ny, nx = cut.shape
    corners = np.array([(x, y, z) for x in (0, nx - 1) for y in (0, ny - 1) for z in (0, nwave - 1)], float)
    truth = WCS(fits.getheader(files["cube"], "DATA")).all_pix2world(corners + [stamp.xlo, stamp.ylo, 0], 0)
    with fits.open(fast_path) as fast, fits.open(tmp_path / "mpdaf_cut.fits") as slow, \
            fits.open(tmp_path / "mpdaf_build.fits") as built:
        fast.verify("exception")
        for ext in ("CUB_MUSE_DATA", "CUB_MUSE_STAT"):
            assert fast[ext].data.dtype == slow[ext].data.dtype == np.dtype(">f4")
            assert np.array_equal(fast[ext].data, slow[ext].data, equal_nan=True), ext     # bitwise
            world = WCS(fast[ext].header).all_pix2world(corners, 0)
            assert np.allclose(world, WCS(slow[ext].header).all_pix2world(corners, 0), rtol=0, atol=1e-10)
            assert np.allclose(world, truth, rtol=0, atol=1e-10), ext
        for ext in ("CUB_MUSE_CONTSUB_DATA", "CUB_MUSE_CONTSUB_STAT"):
            assert np.allclose(fast[ext].data, built[ext].data, rtol=1e-6, atol=0), ext
            assert np.allclose(WCS(fast[ext].header).all_pix2world(corners, 0), truth, rtol=0, atol=1e-10)
    back = Source.from_file(str(fast_path))
    assert back.header["QFLAGS"] == obj.info["FLAGS"]
    sub = back.cubes["MUSE"]
    assert sub.shape == cut.shape and sub.wcs.isEqual(cut.wcs) and sub.wave.isEqual(cut.wave)
    assert sub.unit == cut.unit == full.unit
    assert np.array_equal(sub.data.filled(np.nan), cut.data.filled(np.nan), equal_nan=True)
    assert np.array_equal(sub.var.filled(np.nan), cut.var.filled(np.nan), equal_nan=True)
    contsub = back.cubes["MUSE_CONTSUB"]
    assert contsub.wcs.isEqual(cut.wcs) and contsub.unit == full.unit
    skysub = cut.data.filled(np.nan).astype(np.float64) - obj.spectra["MUSE_SKY"][0][:, None, None]
    expected = skysub - autospec.continuum_fit(skysub, params["CONT_POLY"])
    scale = np.abs(expected).max()
    assert np.allclose(contsub.data.filled(np.nan), expected, rtol=0, atol=1e-6 * scale)
    assert np.array_equal(contsub.var.filled(np.nan), cut.var.filled(np.nan), equal_nan=True)
