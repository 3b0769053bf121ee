"""Tests of autospec's plots (make_plots): what the figures show (labels, flux unit, error
bands, S/N, colour bars, the catalogue position, N/E arrows, mask outlines), valid JPEGs
written atomically, robustness (NaN images, empty masks, no XCOR, no unit), and that the
figures reused across objects carry nothing of the previous object.  The simulated scene is
``tests/simulate_autospec.default_scene`` (60 x 60 x 300).
"""
import dataclasses
import warnings

import numpy as np
import pytest

import autospec
import simulate_autospec as sim

P = autospec

KINDS = ("IMAGES", "MASKS", "XCOR")


# ---------------------------------------------------------------------------
# Fixtures: a simulated cube, its RunState and extracted objects
# ---------------------------------------------------------------------------
def _build_state(cube, catalogue, output, **params):
    base = dict(DATACUBE=cube, CATALOG=catalogue, APER=[1.0, 2.0], SIZE=5.0, OUTPUT=output)
    base.update(params)
    overrides = {("autospec", k): autospec._normalise_value(autospec._param_entries()[k], v)
                 for k, v in base.items()}
    values = autospec.load_autospec_config(None, None, overrides, validate=True)["autospec"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:                                   # the current API
            rows = autospec.read_catalogue(values["CATALOG"], values["MODE"], values["SIZE"],
                                           values["REF"], apertures=values["APER"])
            state = autospec.build_state(values, True, rows)
        except TypeError:                      # the API before 744f05c
            rows = autospec.read_catalogue(values["CATALOG"], values["MODE"], values["SIZE"],
                                           values["REF"])
            state = autospec.build_state(values, True)
    return state, rows


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plots_scene")
    scene = sim.default_scene()
    files = sim.write_scene(scene, tmp)
    return scene, files, tmp


@pytest.fixture(scope="module")
def run(scene_files):
    """(state, [(row, result)]) for the six simulated objects."""
    _, files, tmp = scene_files
    state, rows = _build_state(files["cube"], files["catalogue"], tmp / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objects = [(row, autospec.extract_object(state, row)) for row in rows]
    return state, objects


@pytest.fixture(autouse=True)
def fresh_cache():
    P._PLOT_FIGURES.clear()
    yield
    P._PLOT_FIGURES.clear()


def _with_output(state, path):
    return dataclasses.replace(state, params=dict(state.params, OUTPUT=str(path)))


def _pixels(fig):
    return np.asarray(P._render_figure(fig).buffer_rgba())[..., :3].copy()


def _figure(kind, state, result, title="ID x"):
    if kind == "SPECTRA":
        return P._spectra_figure(state, result, title)
    return P._image_figure(kind, P._image_panels(state, result)[kind], state, result, title)


def _artist_counts(fig):
    return [len(fig.axes), len(fig.texts)] + [
        (len(ax.lines), len(ax.patches), len(ax.texts), len(ax.images), len(ax.collections))
        for ax in fig.axes]


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------
def test_make_plots_writes_four_valid_jpegs(run, tmp_path):
    from PIL import Image
    state, objects = run
    row, result = objects[0]
    P.make_plots(_with_output(state, tmp_path), row, result)
    outdir = tmp_path / "images" / str(row.ID)
    names = sorted(p.name for p in outdir.iterdir())
    assert names == ["%s_%s.jpg" % (row.ID, k) for k in ("IMAGES", "MASKS", "SPECTRA", "XCOR")]
    for path in outdir.iterdir():
        assert 4_000 < path.stat().st_size < 1_000_000, path
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.width >= 300 and image.height >= 150
            image.verify()
        with Image.open(path) as image:          # a picture, not a blank page
            assert np.asarray(image.convert("L")).std() > 10


def test_overwrites_in_place_and_leaves_no_temporary_files(run, tmp_path):
    state, objects = run
    row, result = objects[1]
    state = _with_output(state, tmp_path)
    P.make_plots(state, row, result)
    P.make_plots(state, row, result)              # again: replaced atomically
    outdir = tmp_path / "images" / str(row.ID)
    assert len(list(outdir.iterdir())) == 4
    assert not [p for p in outdir.iterdir() if p.name.startswith(".") or ".part" in p.name]


def test_no_xcor_file_without_cross_correlation(run, tmp_path):
    state, objects = run
    row, result = objects[0]
    P.make_plots(_with_output(state, tmp_path), row, dataclasses.replace(result, xcor={}))
    names = sorted(p.name for p in (tmp_path / "images" / str(row.ID)).iterdir())
    assert names == ["%s_%s.jpg" % (row.ID, k) for k in ("IMAGES", "MASKS", "SPECTRA")]


# ---------------------------------------------------------------------------
# What the figures show
# ---------------------------------------------------------------------------
def test_spectra_axis_labels_titles_snr_and_error_band(run):
    state, objects = run
    row, result = objects[0]
    fig = P._spectra_figure(state, result, "ID 1")
    slot = fig._autospec_plot
    names = [result.info["REF_SPECTRUM"]] + [n for n in result.spectra
                                             if n.startswith("CROSS_CORRELATION")]
    assert len(fig.axes) == len(names) == 4
    assert fig.axes[-1].get_xlabel() == "wavelength (Angstrom)"
    assert str(state.cube.unit) in fig.get_supylabel()
    assert fig.get_supylabel() == "flux (%s)" % state.cube.unit
    assert "erg" in fig.get_supylabel() and "Angstrom" in fig.get_supylabel()
    for ax, p, name in zip(fig.axes, slot.panels, names):
        flux, var = result.spectra[name]
        assert ax.get_title(loc="left") == name
        snr = autospec.integrated_snr(flux, var)
        assert p["snr"].get_text() == "%.1f" % snr and np.isfinite(snr)
        x, y = p["line"].get_data()
        assert np.array_equal(y, flux) and np.array_equal(x, state.cube.wave)
        verts = p["band"].get_path().vertices
        n = len(flux)
        np.testing.assert_allclose(verts[:n, 1], flux - np.sqrt(var))
        np.testing.assert_allclose(verts[n:2 * n, 1], (flux + np.sqrt(var))[::-1])
        lo, hi = ax.get_ylim()
        assert lo < np.nanmin(flux) and hi > np.nanmax(flux)     # emission lines not clipped
        labels = [t for t in p["ticks"]["labels"] if t.get_text()]
        assert 2 <= len(labels) <= 6
        for text in labels:                      # tick labels are the values at their height
            assert float(text.get_text()) == pytest.approx(text.get_position()[1], rel=1e-6, abs=1e-9)
    assert slot.suptitle.get_text() == "ID 1"


def test_images_colour_bar_position_mask_outlines_and_compass(run):
    state, objects = run
    row, result = objects[0]
    fig = P._image_figure("IMAGES", P._image_panels(state, result)["IMAGES"], state, result)
    slot = fig._autospec_plot
    white, seg = slot.panels[0], slot.panels[1]
    assert white["name"].get_text() == state.cube.prefix + "_WHITE"
    assert seg["name"].get_text().startswith("SEG_")
    colourbars = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    assert len(colourbars) == 1                    # flux image only (not the segmentation)
    labels = [t.get_text() for t in white["ticks"]["labels"] if t.get_text()]
    assert len(labels) >= 2
    stamp = result.subcubes["stamp"]
    ny, nx = stamp.shape                           # a whole stamp fills its panel exactly
    assert white["ax"].get_xlim() == pytest.approx((-0.5, nx - 0.5))
    assert white["ax"].get_ylim() == pytest.approx((-0.5, ny - 0.5))
    for p in (white, seg):                         # the catalogue position, (y, x) -> (x, y)
        x, y = p["cross"].get_data()
        assert (x[0], y[0]) == pytest.approx((stamp.center[1], stamp.center[0]))
    obj, sky = white["outlines"]
    assert obj.get_color() == P._OBJ_COLOUR and sky.get_color() == P._SKY_COLOUR
    for line, name in ((obj, "MASK_OBJ"), (sky, "MASK_SKY")):
        x, y = line.get_data()
        assert len(x) > 0
        edges = np.count_nonzero(np.isnan(x))
        assert edges == _boundary_edges(result.masks[name])
    (north, n_label), (east, e_label) = white["arrows"]
    dn = np.subtract(north.xy, north.xyann)
    de = np.subtract(east.xy, east.xyann)
    assert abs(dn[0]) < 1e-6 * abs(dn[1]) and dn[1] > 0        # north up
    assert abs(de[1]) < 1e-6 * abs(de[0]) and de[0] < 0        # east left (RA increasing left)
    assert (n_label.get_text(), e_label.get_text()) == ("N", "E")
    assert not seg["arrows"]


def _boundary_edges(mask):
    """Edges between mask and non-mask spaxels inside the stamp (independent count)."""
    m = np.asarray(mask, bool)
    return int(np.count_nonzero(m[:, 1:] != m[:, :-1]) + np.count_nonzero(m[1:] != m[:-1]))


def test_masks_and_xcor_figures(run):
    state, objects = run
    row, result = objects[0]
    fig = P._image_figure("MASKS", P._image_panels(state, result)["MASKS"], state, result)
    panels = fig._autospec_plot.panels
    assert [p["name"].get_text() for p in panels] == list(result.masks)
    for p, mask in zip(panels, result.masks.values()):
        assert p["note"].get_text() == "N=%d" % mask.sum()
    assert not any(getattr(ax, "_colorbar", None) for ax in fig.axes)
    fig = P._image_figure("XCOR", P._image_panels(state, result)["XCOR"], state, result)
    panels = fig._autospec_plot.panels
    assert [p["name"].get_text() for p in panels] == list(result.xcor)
    assert sum(getattr(ax, "_colorbar", None) is not None for ax in fig.axes) == len(result.xcor)
    assert len(panels[0]["outlines"][0].get_data()[0]) > 0     # MASK_XCOR outline


def test_colour_bar_ticks_are_the_image_values(run):
    state, objects = run
    _, result = objects[1]
    fig = P._image_figure("IMAGES", P._image_panels(state, result)["IMAGES"], state, result)
    p = fig._autospec_plot.panels[0]
    image = result.images[state.cube.prefix + "_WHITE"]
    vmin, vmax = P._plot_limits(np.asarray(image, float))
    shown = p["im"].get_array()
    np.testing.assert_allclose(shown, (image - vmin) / (vmax - vmin))
    factor = p["ticks"]["offset"].get_text()
    scale = float(factor[1:]) if factor else 1.0
    for text in p["ticks"]["labels"]:
        if text.get_text():
            value = float(text.get_text()) * scale
            assert vmin <= value <= vmax
            assert text.get_position()[1] == pytest.approx((value - vmin) / (vmax - vmin), abs=1e-6)


@pytest.mark.parametrize("rot", [0.0, 30.0, -75.0, 180.0])
@pytest.mark.parametrize("flip", [False, True])
def test_compass_follows_the_wcs(rot, flip):
    from mpdaf.obj import WCS
    step = 0.2 / 3600
    wcs = WCS(crpix=(13, 13), crval=(-30.0, 150.1), cdelt=(step, step if flip else -step),
              deg=True, rot=rot, shape=(25, 25))
    north, east = P._compass_vectors(wcs)
    y0, x0 = 12.0, 12.0
    dec, ra = wcs.pix2sky([[y0, x0]])[0]
    dn = wcs.sky2pix([[dec + 2e-5, ra]])[0] - (y0, x0)
    de = wcs.sky2pix([[dec, ra + 2e-5 / np.cos(np.radians(dec))]])[0] - (y0, x0)
    np.testing.assert_allclose(north, dn[::-1] / np.hypot(*dn), atol=1e-4)
    np.testing.assert_allclose(east, de[::-1] / np.hypot(*de), atol=1e-4)


def test_compass_of_the_simulated_cube_and_missing_wcs(run):
    state, _ = run
    north, east = P._compass_vectors(state.cube.wcs)
    np.testing.assert_allclose(north, (0, 1), atol=1e-9)
    np.testing.assert_allclose(east, (-1, 0), atol=1e-9)
    assert P._compass_vectors(None) is None


def test_mask_outline_shapes():
    one = np.zeros((5, 5), bool)
    one[2, 3] = True
    x, y = P._mask_outline(one)
    assert np.count_nonzero(np.isnan(x)) == 4                   # a square
    pts = np.stack([x[~np.isnan(x)], y[~np.isnan(y)]], 1)
    assert {tuple(p) for p in pts} == {(2.5, 1.5), (3.5, 1.5), (2.5, 2.5), (3.5, 2.5)}
    for mask in (np.zeros((5, 5)), np.ones((5, 5)), None):      # empty, full (border), none
        assert len(P._mask_outline(mask)[0]) == 0
    edge = np.zeros((4, 4), bool)
    edge[:, 0] = True                                           # on the stamp's border
    assert np.count_nonzero(np.isnan(P._mask_outline(edge)[0])) == 4


def test_tick_labels():
    values, labels, offset = P._plot_tick_labels(-3.2, 812.0, 3)
    assert offset == "" and all(-3.2 <= v <= 812 for v in values) and "0" in labels
    values, labels, offset = P._plot_tick_labels(0.0, 2.4e8, 3)
    assert offset == "x1e8" and labels == ["%g" % (v / 1e8) for v in values]
    values, labels, offset = P._plot_tick_labels(-2e-4, 3e-4, 3)
    assert offset == "x1e-4"
    assert P._plot_tick_labels(np.nan, 1.0, 3) == (pytest.approx(np.empty(0)), [], "") or \
        len(P._plot_tick_labels(np.nan, 1.0, 3)[1]) == 0
    assert len(P._plot_tick_labels(1.0, 1.0, 3)[1]) == 0


def test_long_spectra_drawn_as_their_envelope():
    n = 3681
    x = 4750.0 + 1.25 * np.arange(n)
    y = np.random.default_rng(1).normal(size=n)
    y[1234] = 100.0                                             # a one-channel line
    y[2000:2010] = np.nan
    ex, ey = P._envelope_line(x, y, 736)
    assert len(ex) <= 2 * 736 + 2 and np.nanmax(ey) == 100.0 and np.nanmin(ey) == np.nanmin(y)
    assert np.all(np.diff(ex[np.isfinite(ex)]) >= 0)
    bx, lo, hi = P._envelope_band(x, y - 1, y + 1, 736)
    assert np.nanmax(hi) == 101.0 and len(bx) <= 737
    small = P._envelope_line(x[:300], y[:300], 736)
    assert small[1] is y[:300] or np.array_equal(small[1], y[:300])


# ---------------------------------------------------------------------------
# Robustness
# ---------------------------------------------------------------------------
def _degenerate(result):
    """NaN white light, all-zero masks but a single-spaxel object, no XCOR, NaN spectra."""
    stamp = result.subcubes["stamp"]
    images = {k: np.full_like(np.asarray(v, float), np.nan) for k, v in result.images.items()}
    masks = {k: np.zeros_like(v, bool) for k, v in result.masks.items()}
    cy, cx = (int(round(c)) for c in stamp.center)
    masks["MASK_OBJ"][cy, cx] = True
    segs = {k: np.zeros_like(v) for k, v in result.segs.items()}
    spectra = {}
    for k, (flux, var) in result.spectra.items():
        flux, var = np.array(flux, float), np.array(var, float)
        flux[::7] = np.nan
        var[::5] = np.nan
        spectra[k] = (flux, var)
    ref = result.info["REF_SPECTRUM"]
    spectra[ref] = (np.full_like(spectra[ref][0], np.nan), np.full_like(spectra[ref][1], np.nan))
    return dataclasses.replace(result, images=images, masks=masks, segs=segs, xcor={},
                               spectra=spectra)


def test_nan_images_empty_masks_single_spaxel_missing_xcor_nan_spectra(run, tmp_path):
    from PIL import Image
    state, objects = run
    row, result = objects[2]
    bad = _degenerate(result)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # and no warnings either
        P.make_plots(_with_output(state, tmp_path), row, bad)
    outdir = tmp_path / "images" / str(row.ID)
    assert sorted(p.name for p in outdir.iterdir()) == [
        "%s_%s.jpg" % (row.ID, k) for k in ("IMAGES", "MASKS", "SPECTRA")]
    for path in outdir.iterdir():
        with Image.open(path) as image:
            image.verify()
    images = P._image_figure("IMAGES", P._image_panels(state, bad)["IMAGES"], state, bad)
    white = images._autospec_plot.panels[0]
    assert white["note"].get_text() == "no data"
    assert np.count_nonzero(np.isnan(white["outlines"][0].get_data()[0])) == 4   # 1 spaxel
    assert len(white["outlines"][1].get_data()[0]) == 0                          # no sky
    spectra = P._spectra_figure(state, bad)._autospec_plot.panels
    assert spectra[0]["note"].get_text() == "no finite flux"
    assert spectra[0]["snr"].get_text() == "n/a"
    assert all(p["snr"].get_text() != "n/a" for p in spectra[1:])


def test_unit_less_cube_and_short_or_odd_inputs(run, tmp_path):
    state, objects = run
    row, result = objects[0]
    cube = dataclasses.replace(state.cube, unit=None)
    odd = dataclasses.replace(state, cube=cube, params=dict(state.params, OUTPUT=str(tmp_path),
                                                            CMAP="no_such_map"))
    name = result.info["REF_SPECTRUM"]
    spectra = dict(result.spectra)
    spectra[name] = (spectra[name][0], np.zeros(0))          # no variance at all
    info = dict(result.info, REF_SPECTRUM="NOT_THERE")
    weird = dataclasses.replace(result, spectra=spectra, info=info)
    P.make_plots(odd, row, weird)
    fig = P._spectra_figure(odd, weird)
    assert fig.get_supylabel() == "flux"
    assert len(list((tmp_path / "images" / str(row.ID)).iterdir())) == 4


def test_edge_object_with_a_clipped_stamp(scene_files, tmp_path):
    """A position 1 pixel from the cube's corner: clipped stamp, object pixel centred."""
    scene, files, tmp = scene_files
    ra, dec = scene.radec(1.0, 2.0)
    cat = tmp_path / "edge.txt"
    cat.write_text("ID RA DEC\n99 %.8f %.8f\n" % (ra, dec))
    state, rows = _build_state(files["cube"], cat, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = autospec.extract_object(state, rows[0])
    stamp = result.subcubes["stamp"]
    assert stamp.shape[0] != stamp.shape[1] or stamp.shape[0] < 25
    P.make_plots(state, rows[0], result)
    assert len(list((tmp_path / "out" / "images" / "99").iterdir())) == 4
    fig = P._image_figure("IMAGES", P._image_panels(state, result)["IMAGES"], state, result)
    ax = fig.axes[0]
    cy, cx = stamp.center
    assert np.mean(ax.get_xlim()) == pytest.approx(round(cx)) and np.mean(ax.get_ylim()) == pytest.approx(round(cy))
    x0, x1 = ax.get_xlim()
    assert x0 <= -0.5 and x1 >= stamp.shape[1] - 0.5                        # the whole stamp
    assert np.diff(ax.get_xlim()) == pytest.approx(np.diff(ax.get_ylim()))   # square pixels


# ---------------------------------------------------------------------------
# Re-used figures: nothing left over from the previous object
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS + ("SPECTRA",))
def test_reused_figure_has_no_artists_or_pixels_of_the_previous_object(run, kind):
    state, objects = run
    (_, first), (_, second) = objects[0], objects[1]
    fig = _figure(kind, state, first, "ID 1")
    before = _pixels(fig)
    counts = _artist_counts(fig)
    again = _figure(kind, state, second, "ID 2")
    assert again is fig                                        # re-used, not rebuilt
    after = _pixels(again)
    assert _artist_counts(again) == counts                     # no artist added
    assert not np.array_equal(before, after)
    P._PLOT_FIGURES.clear()
    fresh = _figure(kind, state, second, "ID 2")
    assert fresh is not fig
    assert np.array_equal(_pixels(fresh), after)               # identical to a fresh figure
    if kind == "SPECTRA":
        for p, name in zip(again._autospec_plot.panels, P._spectrum_names(second)):
            assert np.array_equal(p["line"].get_data()[1], second.spectra[name][0])
            assert len(p["ax"].lines) == len(fresh._autospec_plot.panels[0]["ax"].lines)


def test_static_layer_redrawn_when_names_change(run):
    state, objects = run
    (_, first), (_, second) = objects[0], objects[1]
    old = second.info["REF_SPECTRUM"]
    spectra = {("RENAMED_REF" if k == old else k): v for k, v in second.spectra.items()}
    renamed = dataclasses.replace(second, spectra=spectra,
                                  info=dict(second.info, REF_SPECTRUM="RENAMED_REF"))
    fig = P._spectra_figure(state, first)
    _pixels(fig)
    assert P._spectra_figure(state, renamed) is fig
    after = _pixels(fig)
    assert fig.axes[0].get_title(loc="left") == "RENAMED_REF"
    P._PLOT_FIGURES.clear()
    assert np.array_equal(_pixels(P._spectra_figure(state, renamed)), after)


def test_cache_is_bounded_and_per_layout(run):
    state, objects = run
    _, result = objects[0]
    for n in range(1, 12):          # 11 layouts of MASKS (1..11 panels)
        masks = {"MASK_%d" % k: result.masks["MASK_OBJ"] for k in range(n)}
        r = dataclasses.replace(result, masks=masks)
        P._image_figure("MASKS", P._image_panels(state, r)["MASKS"], state, r)
    assert len(P._PLOT_FIGURES) == P._PLOT_CACHE_SIZE


def test_save_figure_of_any_figure(tmp_path):
    from matplotlib.figure import Figure
    from PIL import Image
    fig = Figure(figsize=(3, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    P._save_figure(fig, tmp_path / "x.jpg")
    with Image.open(tmp_path / "x.jpg") as image:
        assert image.format == "JPEG" and image.size == (int(3 * fig.dpi), int(2 * fig.dpi))


# ---------------------------------------------------------------------------
# Through autospec.run: one worker and two forked workers
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("nproc", [1, 2])
def test_run_with_plots(scene_files, tmp_path, monkeypatch, nproc):
    from PIL import Image
    scene, files, _ = scene_files
    monkeypatch.setattr(autospec, "make_plots", P.make_plots)
    result = autospec.run(DATACUBE=files["cube"], CATALOG=files["catalogue"], APER=[1.0, 2.0],
                          OUTPUT=tmp_path / "out", PLOTS=True, nproc=nproc, progress=False,
                          overwrite=True)
    assert result["n_failed"] == 0
    for ident in scene.truth:
        outdir = tmp_path / "out" / "images" / str(ident)
        assert sorted(p.name for p in outdir.iterdir()) == [
            "%s_%s.jpg" % (ident, k) for k in ("IMAGES", "MASKS", "SPECTRA", "XCOR")]
        for path in outdir.iterdir():
            with Image.open(path) as image:
                image.verify()
