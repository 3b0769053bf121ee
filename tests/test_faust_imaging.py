"""Tests of faust_imaging.py: catalogue, configuration, chunk book-keeping, and the real
CASA pipeline (tclean, masks, post-processing, chunking, moments, QA) on simulated
ALMA measurement sets from tests/simulate.py.

The simulated 12 m MS (20 channels of 0.5 km/s, CO 2-1) holds a
compact line source of known position, velocity, width and flux and an extended clump.
The pipeline runs with natural weighting (the simulator's expected noise is for natural
weighting), 5 pixels per beam, a 1.2 x primary-beam field, and a faster clean loop
(gain 0.2, cyclefactor 0.5, auto-multithresh growiterations 75 with fastnoise; the
11-antenna array's high PSF sidelobes otherwise force ~13 major cycles).
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits
import pytest

import faust_imaging as fi
from conftest import ROOT, casatools

needs_casa = pytest.mark.skipif(casatools is None, reason="casatools is not installed")

from simulate_faust import (FIELD, LABEL, NCHAN, SPW_CSV, faust_sim_sources,  # noqa: E402
                            write_config)

# ---------------------------------------------------------------- pure unit tests
def test_catalogue_holds_the_faust_facts():
    catalog = fi.load_catalog()
    assert len(catalog.targets) == 13
    assert catalog.target("CB68") == fi.Target("CB68", 0.36, 5.0)
    assert catalog.target("L1527").vsys == 5.85
    assert "244.936GHz_CS" in catalog.spws and "93.176GHz_N2Hp" in catalog.spws
    assert len(catalog.spws_by_setup()[1]) == 13 and len(catalog.spws_by_setup()[3]) == 7
    cs = catalog.spw("244.936GHz_CS")
    assert (cs.setup, cs.nchan, cs.ot_name) == (2, 480, "BB_1#SW-03#FULL_RES")
    assert cs.chan_width == pytest.approx(141.113, abs=1e-3)
    assert catalog.setup(3).kinds == ("12m",)
    assert fi.ALL_FIELD_NAMES == list(catalog.targets)
    assert fi.ALL_SPW_LABELS == list(catalog.spws)


def test_unknown_field_and_label_list_the_known_ones():
    catalog = fi.load_catalog()
    with pytest.raises(fi.InputError, match=r"unknown field 'NoSuch'.*CB68.*VLA1623A"):
        catalog.target("NoSuch")
    with pytest.raises(fi.InputError, match=r"unknown SPW label '93.181GHz_N2Hp'.*93.176GHz_N2Hp"):
        catalog.spw("93.181GHz_N2Hp")


def test_spw_label_window_and_chunk_names():
    spw = fi.ALL_SPWS["244.936GHz_CS"]
    # 20 km/s at 244.936 GHz with 141.113 kHz channels (0.1727 km/s) -> 116 channels
    assert spw.nchan_from_window("20km/s") == math.ceil(20 / (141.11328e3 / 244.9355565e9 * 299792.458))
    chunk = fi.ChunkConfig("244.9GHz", 100, 50, 2)
    assert spw.with_chunk(chunk).label == "244.936GHz_CS_chunk2"
    assert spw.label == "244.936GHz_CS"            # copy, not mutated
    other = spw.copy()
    other.mol_name, other.restfreq = "CH3CHO", "244.9GHz"
    assert other.label == "244.900GHz_CH3CHO" and spw.mol_name == "CS"
    assert fi.Target("X", 0.3, 5.0).vlsr_from_window("20km/s") == "-5.0km/s"


def test_chunk_channel_conversions_on_the_edges():
    # The cookbook example: 477 channels in 4 chunks; channel 255 is channel 17 of chunk 2.
    counts = fi.split_channels(477, 4)
    assert counts == [119, 119, 119, 120] and sum(counts) == 477
    starts = np.cumsum([0] + counts[:-1])
    chunks = [fi.ChunkConfig("%dHz" % i, int(s), n, i) for i, (s, n) in enumerate(zip(starts, counts))]
    chunk2 = chunks[2]
    assert chunk2.convert_full_chan_to_chunk(255) == 17
    assert chunk2.convert_chunk_chan_to_full(17) == 255
    assert chunk2.fullcube_chan_indices[0] == 238 and chunk2.fullcube_chan_indices[-1] == 356
    assert chunk2.convert_full_chan_to_chunk(238) == 0
    assert chunk2.convert_full_chan_to_chunk(356) == 118
    with pytest.raises(fi.InputError, match="not in chunk 2"):
        chunk2.convert_full_chan_to_chunk(237)
    with pytest.raises(fi.InputError, match="outside chunk 2"):
        chunk2.convert_chunk_chan_to_full(119)

    class Fake:
        def __init__(self, chunk):
            self.chunk = chunk
    cset = fi.ChunkedConfigSet([Fake(c) for c in chunks], prototype=object())
    assert cset.nchan_total == 477
    assert cset.get_chunk_from_channel(0).chunk.index == 0
    assert cset.get_chunk_from_channel(118).chunk.index == 0
    assert cset.get_chunk_from_channel(119).chunk.index == 1
    assert cset.get_chunk_from_channel(476).chunk.index == 3
    with pytest.raises(fi.InputError, match="outside the cube"):
        cset.get_chunk_from_channel(477)
    with pytest.raises(fi.InputError, match="nchunks = 5"):
        fi.split_channels(4, 5)


def test_robust_rms_matches_numpy_std_for_gaussian_noise():
    rng = np.random.default_rng(1)
    values = rng.normal(0.0, 2.0, 200_000)
    values[:1000] = 50.0                       # 0.5 % outliers barely move the MAD
    assert fi.robust_rms(values) == pytest.approx(2.0, rel=0.02)
    assert math.isnan(fi.robust_rms([np.nan, 0.0]))


def _covariance_kernel(beam, target, cell):
    """The smoothing kernel of the covariance algebra faust_imaging used before radio-beam: the
    reference the radio-beam kernels are held to (C_kernel = C_target - C_beam, +-3 sigma)."""
    def covariance(b):
        bmaj, bmin, bpa = b
        pa = math.radians(bpa)
        major, minor = np.array([-math.sin(pa), math.cos(pa)]), np.array([math.cos(pa), math.sin(pa)])
        return (bmaj ** 2 * np.outer(major, major) + bmin ** 2 * np.outer(minor, minor)) / (8 * math.log(2))
    c_kernel = (covariance(target) - covariance(beam)) / cell ** 2
    half = int(math.ceil(3.0 * math.sqrt(np.linalg.eigvalsh(c_kernel).max())))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    offsets = np.stack([xx, yy], axis=-1).astype(float)
    kernel = np.exp(-0.5 * np.einsum("...i,ij,...j->...", offsets, np.linalg.inv(c_kernel), offsets))
    return kernel / kernel.sum()


def test_smoothing_kernels_from_radio_beam_match_the_covariance_algebra():
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(60):
        bmaj = rng.uniform(0.5, 3.0)
        beam = (bmaj, bmaj * rng.uniform(0.3, 1.0), rng.uniform(-90, 90))
        scale = rng.uniform(1.05, 3.0) * bmaj           # target minor axis > beam major: always larger
        target = (scale * rng.uniform(1.0, 1.5), scale, rng.uniform(-90, 90))
        for goal in (target, (scale, scale, 0.0)):
            ours, reference = fi._smoothing_kernel(beam, goal, 0.28), _covariance_kernel(beam, goal, 0.28)
            assert ours.shape == reference.shape
            worst = max(worst, float(np.abs(ours - reference).max()))
    assert worst < 1e-10, worst
    # worked by hand: circular 1" -> 2" beams, cell 0.1": a Gaussian of FWHM sqrt(3)" = 17.32 px
    kernel = fi._smoothing_kernel((1.0, 1.0, 0.0), 2.0, 0.1)
    sigma = math.sqrt(3.0) / math.sqrt(8 * math.log(2)) / 0.1
    half = kernel.shape[0] // 2
    assert half == math.ceil(3 * sigma)
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    gauss = np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
    assert np.abs(kernel - gauss / gauss.sum()).max() < 1e-12
    # equal beams: a delta; a target equal to the beam along one axis: a 1-D kernel (radio-beam
    # refuses it, the target is widened by a 0.1-pixel beam), within 4e-4 of the kernel's peak
    assert fi._smoothing_kernel((2.0, 1.0, 30.0), (2.0, 1.0, 30.0), 0.28).tolist() == [[1.0]]
    one_d = fi._smoothing_kernel((2.0, 1.0, 0.0), (2.0, 1.5, 0.0), 0.28)     # [y, x]; PA 0: along x
    sigma = math.sqrt(1.5 ** 2 - 1.0 ** 2) / math.sqrt(8 * math.log(2)) / 0.28
    half = one_d.shape[1] // 2
    assert one_d.shape[0] == one_d.shape[1] and half == math.ceil(3 * sigma)
    row = np.exp(-np.arange(-half, half + 1) ** 2 / (2 * sigma ** 2))
    reference = np.zeros_like(one_d)
    reference[half] = row / row.sum()
    assert np.abs(one_d - reference).max() < 4e-4 * reference.max()
    with pytest.raises(fi.InputError, match=r"cannot smooth beam \(2.0, 1.0, 0.0\) to the smaller target"):
        fi._smoothing_kernel((2.0, 1.0, 0.0), (1.9, 1.5, 0.0), 0.28)


def test_smoothing_to_a_larger_beam_keeps_the_peak_in_jy_per_beam():
    """A point source (peak 1 Jy/beam) seen with a 1.2" x 0.8" beam, smoothed to 2.5": its peak in
    Jy/beam of the new beam is still 1 (the beam-area ratio), and its FWHM is 2.5"."""
    cell, n = 0.1, 161
    yy, xx = np.mgrid[:n, :n] - n // 2
    bmaj, bmin, pa = 1.2, 0.8, 40.0
    rot = math.radians(pa)
    along = (-xx * math.sin(rot) + yy * math.cos(rot)) * cell      # x = west, as the module's axes
    across = (xx * math.cos(rot) + yy * math.sin(rot)) * cell
    plane = np.exp(-4 * math.log(2) * ((along / bmaj) ** 2 + (across / bmin) ** 2)).T     # [x, y]
    smoothed = fi.smooth_plane_to_resolution(plane, np.ones_like(plane, bool), (bmaj, bmin, pa), 2.5, cell)
    # the kernel is cut at +-3 sigma and renormalised: the peak comes out 0.23 % high
    assert smoothed.max() == pytest.approx(1.0, rel=4e-3)
    profile = smoothed[:, n // 2]
    assert np.sum(profile > 0.5) * cell == pytest.approx(2.5, abs=2 * cell)


def test_helpers_worked_by_hand():
    assert fi.optimum_imsize(121) == 128 and fi.optimum_imsize(46) == 48
    assert fi.calc_res(230.538e9, 12.0) == pytest.approx(22.35, rel=1e-3)   # lambda/D in arcsec
    smoothed = fi.hanning_smooth(np.array([0.0, 0.0, 4.0, 0.0, 0.0]))
    assert smoothed.tolist() == [0.0, 1.0, 2.0, 1.0, 0.0]
    assert fi.format_cube_robust(0.5) == (0.5, "briggs")
    assert fi.format_cube_robust("natural") == (None, "natural")
    assert fi.weighting_label(0.5) == "0.5" and fi.weighting_label("natural") == "natural"
    with pytest.raises(fi.ConfigError, match="weighting = 'superuniform'"):
        fi.parse_weighting("superuniform")


def test_config_cross_checks_report_every_problem(tmp_path):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("[Paths]\nms_pattern =\n[Thresholds]\nseed_mask_sigma = 4, 5\n"
                   "[Catalog]\nextra_targets = X:1\n")
    with pytest.raises(fi.ConfigError) as info:
        fi.get_config(cfg)
    message = str(info.value)
    assert "ms_pattern is empty and ms_files lists nothing" in message
    assert "seed_mask_sigma" in message and "extra_targets item 'X:1'" in message


def test_cli_list_and_bad_input_exit_codes(tmp_path, capsys):
    assert fi.main(["list", "labels", "-q"]) == 0
    assert "244.936GHz_CS" in capsys.readouterr().out
    cfg = tmp_path / "f.cfg"
    cfg.write_text("[Imaging]\nno_such_key = 1\n")
    assert fi.main(["list", "-c", str(cfg)]) == 2
    assert "unknown key 'no_such_key'" in capsys.readouterr().err
    # unknown field: exit 2, message lists the known fields, nothing written
    cfg = write_config(tmp_path)
    assert fi.main(["run", "NoSuch", LABEL, "-c", str(cfg), "-q"]) == 2
    assert "known fields are BHB07-11" in capsys.readouterr().err
    assert fi.main(["run", FIELD, "1.000GHz_X", "-c", str(cfg), "-q"]) == 2
    assert "known labels are" in capsys.readouterr().err
    # DATA_DIR missing, then empty
    assert fi.main(["run", FIELD, LABEL, "-c", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err
    assert "DATA_DIR" in err and "does not exist" in err
    (tmp_path / "data").mkdir()
    assert fi.main(["run", FIELD, LABEL, "-c", str(cfg), "-q"]) == 2
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "prod").exists()


def test_chunk_jobfile_has_barriers_and_runs_dry(tmp_path):
    jobs = tmp_path / "jobs.txt"
    fi.write_chunk_jobfile("CB68", "244.936GHz_CS", 5, jobs, nworkers=2, config_path=tmp_path / "f.cfg")
    lines = [l for l in jobs.read_text().splitlines() if not l.startswith("#")]
    assert lines[1] == "wait" and lines[-2] == "wait"
    assert "--phase preprocess" in lines[0] and "--phase postprocess" in lines[-1]
    chunk_lines = lines[2:-2]
    assert len(chunk_lines) == 2 and all("--nworkers 2" in l for l in chunk_lines)
    with pytest.raises(fi.OutputExistsError):
        fi.write_chunk_jobfile("CB68", "244.936GHz_CS", 5, jobs)
    result = subprocess.run(["bash", str(ROOT / "pipe_scripts" / "run_pipe.sh"), "--dry-run",
                             "-l", str(tmp_path / "logs"), str(jobs)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------- CASA fixtures
@pytest.fixture(scope="module")
def sim12m(tmp_path_factory):
    """Simulated 12 m MS below DATA_DIR/FAUST_SIM-Setup9 and a config for it."""
    if casatools is None:
        pytest.skip("casatools is not installed")
    from simulate import simulate_alma_line_ms
    root = tmp_path_factory.mktemp("faust12m")
    ms_dir = root / "data" / f"{FIELD}-Setup9"
    ms_dir.mkdir(parents=True)
    sim = simulate_alma_line_ms(ms_dir / "sim12m.ms", array="12m", nchan=NCHAN, seed=3,
                                vsys_channel=6, sources=faust_sim_sources())
    return {"root": root, "cfg": write_config(root), "sim": sim}


@pytest.fixture(scope="module")
def pipeline12m(sim12m):
    """The unchunked pipeline run end to end (natural weighting)."""
    config = fi.ImageConfig.from_name(FIELD, LABEL, kind="12m", config=sim12m["cfg"])
    final = config.run_pipeline(ext="clean", use_chunking=False)
    return {**sim12m, "config": config, "final": Path(final)}


def _read_fits(path):
    from astropy.io import fits
    with fits.open(path) as hdul:
        return np.squeeze(hdul[0].data).astype(float), hdul[0].header.copy()


def _velocity_axis(header):
    """Radio velocities (km/s) of the FITS cube channels."""
    n = header["NAXIS3"]
    freqs = header["CRVAL3"] + (np.arange(n) + 1 - header["CRPIX3"]) * header["CDELT3"]
    return 299792.458 * (1 - freqs / header["RESTFRQ"])


def _source_pixel(header, sim, source):
    from astropy.wcs import WCS
    wcs = WCS(header).celestial
    x, y = wcs.world_to_pixel(source.coord)
    return float(x), float(y)


# ------------------------------------------------------------------- CASA tests
@pytest.mark.casa
def test_final_cube_name_units_beam_and_flux(pipeline12m):
    sim, config, final = pipeline12m["sim"], pipeline12m["config"], pipeline12m["final"]
    prod = pipeline12m["root"] / "prod" / "images" / FIELD
    assert final == prod / f"{FIELD}_{LABEL}_12m_natural_clean.image.pbcor.common.fits"
    assert final.exists() and Path(str(final).replace("image.pbcor.common", "mask")).exists()
    data, header = _read_fits(final)
    assert header["BUNIT"].lower() == "jy/beam"
    assert "BMAJ" in header and "CASAMBM" not in header        # one common beam
    bmaj, bmin = header["BMAJ"] * 3600, header["BMIN"] * 3600
    # the beam matches the simulator's uv-moment estimate within 10 %
    assert bmaj == pytest.approx(sim.beam[0].value, rel=0.10)
    assert bmin == pytest.approx(sim.beam[1].value, rel=0.10)
    # integrated line flux of the compact source within 10 % of the injected flux
    cell = abs(header["CDELT2"]) * 3600
    beam_pix = math.pi * bmaj * bmin / (4 * math.log(2)) / cell ** 2
    x0, y0 = _source_pixel(header, sim, sim.compact)
    yy, xx = np.mgrid[:data.shape[1], :data.shape[2]]
    aperture = np.hypot(xx - x0, yy - y0) * cell < 2.0        # encloses 99 % of the beam
    dv = sim.channel_width.value
    # the compact line's channels (> 1 % of its peak): the clump's negative bowl (missing
    # short spacings) lies 7" away and at other velocities
    velocities = _velocity_axis(header)
    line = np.abs(velocities - sim.compact.velocity.value) < 3.1 * sim.compact.sigma_velocity.value
    flux = np.nansum(data[line][:, aperture]) / beam_pix * dv
    # The simulator does not attenuate the sky by the primary beam, so the PB-corrected
    # cube holds truth / PB (PB ~ 0.99 at the compact source, 1.4" from the centre).
    pb, _ = _read_fits(str(final).replace("image.pbcor.common", "pb"))
    pb_at_source = pb[np.flatnonzero(line)[0], int(round(y0)), int(round(x0))]
    assert 0.95 < pb_at_source < 1.0
    truth = sim.compact.integrated_flux.value / pb_at_source
    assert flux == pytest.approx(truth, rel=0.10), (flux, truth)
    # the rms estimate (dirty cube, 1.4826 MAD) within 15 % of the true noise
    assert config.rms == pytest.approx(sim.expected_rms.value, rel=0.15)


@pytest.mark.casa
@pytest.mark.filterwarnings("error::RuntimeWarning")   # QA plots of constant planes divided by zero
def test_qa_summary_stage_skipping_and_moments(pipeline12m, caplog, tmp_path):
    sim, config, final = pipeline12m["sim"], pipeline12m["config"], pipeline12m["final"]
    base = config.get_imagebase("clean")
    summary = json.loads(Path(base + ".qa.json").read_text())
    assert summary["flags"] == [] and summary["max_residual_sigma"] < 5.5
    # the data column and Stokes choice reach tclean and the stage markers
    assert all(c["datacolumn"] == "corrected" and c["stokes"] == "I" for c in config.tclean_calls)
    markers = sorted(Path(base).parent.glob(Path(base).name + ".*.done.json"))
    assert markers and all(json.loads(m.read_text())["datacolumn"] == "corrected" for m in markers)
    assert summary["peak_snr"] > 30 and len(summary["mask_fraction"]) == summary["nchan"]
    assert sim.nchan - 2 <= summary["nchan"] <= sim.nchan     # common coverage of the band
    assert max(summary["mask_fraction"]) < 0.5
    assert summary["rms_jy_beam"] == pytest.approx(sim.expected_rms.value, rel=0.15)
    # the provenance beside the products names the configuration, the data and what each stage did
    run = json.loads(Path(base + ".run.json").read_text())
    assert run["tool"] == "faust_imaging" and (run["field"], run["label"], run["kind"]) == (FIELD, LABEL, "12m")
    assert run["config"]["Imaging"]["gain"] == 0.2 and run["config"]["AutoMultithresh"]["growiterations"] == 75
    assert run["tunables"]["scales"] == config.scales and run["final"] == str(final)
    assert run["stages"][LABEL] == dict.fromkeys(["dirty", "nomask", "seed", "clean", "post"], "ran")
    assert run["tclean_calls"] == 3 and run["vis"] == list(config.dset.vis)
    # a re-run reuses every stage (records and products match), and says so
    mtime = final.stat().st_mtime
    with caplog.at_level("INFO", logger="faust_imaging"):
        config.run_pipeline(ext="clean", use_chunking=False)
    assert final.stat().st_mtime == mtime
    assert [r.message.split(":")[0] for r in caplog.records if ": reusing " in r.message] == [
        "stage dirty", "stage nomask", "stage seed", "stage clean", "stage post"]
    # the records (one StageLedger file per stage) hold settings, MS digests and the results
    marker = json.loads(Path(base + ".clean.done.json").read_text())
    assert len(marker["fingerprint"]) == 16 and marker["stage"] == "clean"
    assert list(marker["inputs"]) == [str(v) for v in config.dset.vis] and marker["inputs"][str(config.dset.vis[0])]
    assert {k: v for k, v in marker["settings"].items() if k.startswith("kwargs.")} == {
        "kwargs.mask_method": "seed+multithresh", "kwargs.sigma": 3.0, "kwargs.ext": "clean"}
    dirty = json.loads(Path(config.dirty_imagebase + ".dirty.done.json").read_text())
    assert dirty["rms_estimate"] == pytest.approx(config.noise_record()["rms_dirty"])
    # other settings are not "done": the fingerprint and the ledger's reason say what changed
    other = fi.ImageConfig.from_name(FIELD, LABEL, kind="12m", config=pipeline12m["cfg"])
    assert other.stage_fingerprint("clean", sigma=3.0) == config.stage_fingerprint("clean", sigma=3.0)
    assert other.stage_fingerprint("clean", sigma=3.0) != config.stage_fingerprint("clean", sigma=2.5)
    kwargs = {"mask_method": "seed+multithresh", "sigma": 3.0, "ext": "clean"}
    assert other.stages.why_not_current(base, "clean", kwargs) is None
    other.gain = 0.1                                   # an attribute edit is a settings change too
    assert other.stages.why_not_current(base, "clean", kwargs) == "settings changed (tunables.gain: 0.2 -> 0.1)"
    # moments and QA obey --dry-run: they name what they would write and write nothing
    cfg = str(pipeline12m["cfg"])
    elsewhere = ["--set", "Paths.MOMENT_DIR=%s" % (tmp_path / "m"), "--set", "Paths.PLOT_DIR=%s" % (tmp_path / "p")]
    assert fi.main(["moments", FIELD, "-c", cfg, "--dry-run", "-q"] + elsewhere) == 0
    assert fi.main(["qa", FIELD, "-c", cfg, "--dry-run", "-q"] + elsewhere) == 0
    assert not list(tmp_path.iterdir())
    # moment maps: units, and mom1 at the compact source within one channel of vsys
    written = fi.make_all_moment_maps(FIELD, ext="clean", config=pipeline12m["cfg"])
    assert len(written) == 1
    maps = written[0]
    assert set(fi.MOMENTS) <= set(maps) and "mom0.pbcor" in maps
    mom1, header = _read_fits(maps["mom1"])
    assert header["BUNIT"] == "km/s" and header["NAXIS"] == 2
    # the plane header (spectral-cube's CASA reader): the cube's celestial WCS, beam and telescope
    common = fits.getheader(final)
    for key in ("CRVAL1", "CRVAL2", "CDELT1", "CDELT2", "CRPIX1", "CRPIX2", "BMAJ", "BMIN", "BPA"):
        assert header[key] == pytest.approx(common[key], rel=1e-9), key
    assert header["TELESCOP"] == "ALMA" and header["CTYPE1"] == "RA---SIN"
    x0, y0 = _source_pixel(header, sim, sim.compact)
    velocity = mom1[int(round(y0)), int(round(x0))]
    assert abs(velocity - sim.compact.velocity.value) < sim.channel_width.value
    mom0, header0 = _read_fits(maps["mom0"])
    assert header0["BUNIT"] == "Jy/beam.km/s" and np.nanmax(mom0) > 0
    mom2, header2 = _read_fits(maps["mom2"])
    measured = mom2[int(round(y0)), int(round(x0))]
    # the reference: mom2 of the noise-free injected line through the same selection (window,
    # Hanning-smoothed cube above m2_sigma x rms / 1.305): clipping narrows it below sigma_v
    peak = _read_fits(maps["max"])[0][int(round(y0)), int(round(x0))]
    velo = _velocity_axis(_read_fits(final)[1])
    sigma_v, v0 = sim.compact.sigma_velocity.value, sim.compact.velocity.value
    model = np.exp(-0.5 * ((velo - v0) / sigma_v) ** 2)
    model *= peak / model.max()
    padded = np.concatenate([model[:1], model, model[-1:]])
    hanning = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    moments = fi.get_config(pipeline12m["cfg"])["Moments"]
    select = (np.abs(velo - 5.85) <= moments["vwin"]) & (
        hanning > moments["m2_sigma"] * header2["RMS"] / fi.HANNING_RMS_FACTOR)
    m1 = np.sum(model[select] * velo[select]) / np.sum(model[select])
    expected = math.sqrt(np.sum(model[select] * (velo[select] - m1) ** 2) / np.sum(model[select]))
    assert expected < sigma_v and measured == pytest.approx(expected, rel=0.15), (measured, expected, sigma_v)
    assert maps["png"].endswith(".moments.png") and Path(maps["png"]).stat().st_size > 20000   # 4 panels + beam
    # QA plots: PNG + PDF for restored and residual; overwrite=False skips them
    plots = fi.make_all_qa_plots(FIELD, ext="clean", config=pipeline12m["cfg"])
    assert sorted(Path(p).suffix for p in plots) == [".pdf", ".pdf", ".png", ".png"]
    assert fi.make_all_qa_plots(FIELD, ext="clean", overwrite=False, config=pipeline12m["cfg"]) == []
    # the same through the command line (existing products are kept without --overwrite)
    mtime = Path(maps["mom1"]).stat().st_mtime
    assert fi.main(["moments", FIELD, "-c", cfg, "-q"]) == 0
    assert Path(maps["mom1"]).stat().st_mtime == mtime
    assert fi.main(["qa", FIELD, "-c", cfg, "-q"]) == 0
    assert fi.main(["moments", "-c", cfg, "-q"]) == 2          # FIELD or --image needed


def _logged_calls(text, task):
    """The ``dry run: <task>(...)`` lines of a log, as {imagename, niter, threshold, ...} dicts."""
    calls = []
    for line in text.splitlines():
        if "dry run: %s(" % task not in line:
            continue
        call = {}
        for key, value in re.findall(r"\b(\w+)=('[^']*'|-?\d+(?:\.\d+)?|<[^>]*>|True|False)", line):
            call.setdefault(key, value.strip("'"))
        calls.append(call)
    return calls


@pytest.mark.casa
def test_dry_run_logs_the_tclean_calls_and_writes_nothing(sim12m, tmp_path, capsys):
    """run --dry-run on the simulated MS: every tclean call is logged with its arguments, the other
    CASA tasks too; no folder, product or record is written; exit 0.  No tclean runs (fast)."""
    prod = tmp_path / "prod"
    common = ["run", FIELD, LABEL, "-c", str(sim12m["cfg"]), "--kind", "12m", "--dry-run",
              "--set", "Paths.PROD_DIR=%s" % prod]
    assert fi.main(common + ["--no-chunked", "--rms", "0.005"]) == 0
    out, err = capsys.readouterr()
    calls = _logged_calls(err, "tclean")
    stem = "%s_%s_12m_natural" % (FIELD, LABEL)
    assert [Path(c["imagename"]).name for c in calls] == [stem + "_dirty", stem + "_nomask", stem + "_clean"]
    assert [c["niter"] for c in calls] == ["0", "10000000", "10000000"] and "threshold" not in calls[0]
    assert calls[1]["threshold"] == "%rJy" % (4.5 * 0.005) and calls[2]["threshold"] == "%rJy" % (3.0 * 0.005)
    assert calls[2]["usemask"] == "auto-multithresh" and calls[2]["growiterations"] == "75"
    assert calls[1]["nchan"].startswith("<channels of the common coverage")   # from the dirty cube's sumwt
    for task in ("impbcor", "exportfits"):
        assert len(_logged_calls(err, task)) == (1 if task == "impbcor" else 3)
    assert out.strip() == str(prod / "images" / FIELD / (stem + "_clean.image.pbcor.common.fits"))
    # chunked (the setup's 2 chunks): the tiny stamp, then three cleans per chunk; no rms: placeholders
    assert fi.main(common) == 0
    calls = _logged_calls(capsys.readouterr().err, "tclean")
    assert [Path(c["imagename"]).name.replace(LABEL, "L") for c in calls] == [
        "%s_L_12m_natural_tinyimg" % FIELD] + ["%s_L_chunk%d_12m_natural_%s" % (FIELD, i, s)
                                              for i in (0, 1) for s in ("dirty", "nomask", "clean")]
    assert calls[2]["threshold"] == "<4.5 x the rms of %s_%s_chunk0_12m_natural_dirty.image>" % (FIELD, LABEL)
    assert not prod.exists()
    # through the library: dry_run on ImageConfig; edited tunables reach the calls and the records
    config = fi.ImageConfig.from_name(FIELD, LABEL, kind="12m", config=sim12m["cfg"], dry_run=True)
    config.config = fi.get_config(config.config, Paths__PROD_DIR=str(prod))
    before = config.stage_fingerprint("clean", sigma=3.0)
    config.nitermax = 7
    assert config.tunables.nitermax == 7 and config.stage_fingerprint("clean", sigma=3.0) != before
    config.rms = 0.005
    assert config.run_pipeline(ext="clean", use_chunking=False).startswith(str(prod))
    assert [c["niter"] for c in config.tclean_calls] == [0, 7, 7]
    assert not prod.exists() and not fi.is_dry_run()


@pytest.mark.casa
def test_noise_from_the_residual_when_a_source_is_bright_in_every_channel(tmp_path):
    """A 0.15 Jy continuum source: its sidelobes inflate the dirty cube's rms ~2.4x; the rms of the
    unmasked clean's residual, iterated, is used instead (measured 1.24x the thermal noise)."""
    if casatools is None:
        pytest.skip("casatools is not installed")
    from dataclasses import replace
    import astropy.units as u
    from simulate import default_sources, simulate_alma_line_ms
    compact, _ = default_sources()
    continuum = replace(compact, name="continuum", peak_flux=0.15 * u.Jy, fwhm_velocity=5000 * u.km / u.s)
    ms_dir = tmp_path / "data" / f"{FIELD}-Setup9"
    ms_dir.mkdir(parents=True)
    sim = simulate_alma_line_ms(ms_dir / "cont.ms", array="12m", nchan=16, seed=3, vsys_channel=6,
                                sources=[continuum])
    config = fi.ImageConfig.from_name(FIELD, LABEL, kind="12m", config=write_config(tmp_path))
    config.run_pipeline(ext="clean", use_chunking=False)
    thermal = sim.expected_rms.value
    marker = json.loads(Path(config.nomask_imagebase + ".nomask.done.json").read_text())
    assert marker["rms_dirty"] > 1.8 * thermal                       # the problem
    assert marker["rms_used"] == config.rms < 1.4 * thermal            # the fix
    assert config.rms < 0.65 * marker["rms_dirty"] and 1 <= len(marker["rms_residual"]) <= 3
    # the QA summary reports both noises
    qa = json.loads(Path(config.get_imagebase("clean") + ".qa.json").read_text())["clean_noise"]
    assert qa["rms_dirty"] == pytest.approx(marker["rms_dirty"]) and qa["rms_used"] == pytest.approx(config.rms)
    assert qa["rms_method"] == "residual" and qa["set_by_hand"] is False
    # an rms given by hand (--rms) is an input of every stage after the dirty cube
    by_hand = fi.ImageConfig.from_name(FIELD, LABEL, kind="12m", config=write_config(tmp_path))
    by_hand.rms = 0.01
    assert by_hand.stage_fingerprint("nomask") != config.stage_fingerprint("nomask")
    # the old behaviour is one setting away
    dirty_only = fi.ImageConfig.from_name(FIELD, LABEL, kind="12m", config=write_config(
        tmp_path, extra="[Thresholds]\nrms_method = dirty\n"))
    assert dirty_only.stage_fingerprint("nomask") != config.stage_fingerprint("nomask")


@pytest.mark.casa
def test_max_residual_check_flags_an_under_cleaned_run(pipeline12m):
    config = fi.ImageConfig.from_name(FIELD, LABEL, kind="12m", config=pipeline12m["cfg"])
    config.nitermax = 1
    config.clean_line(mask_method="auto-multithresh", ext="shallow", sigma=3.0)
    with pytest.warns(fi.UncleanedEmissionWarning, match="uncleaned emission"):
        result = config.postprocess(ext="shallow")
    assert result["residual"]["flagged"] and result["residual"]["max_sigma"] > 20
    summary = json.loads(Path(config.get_imagebase("shallow") + ".qa.json").read_text())
    assert "uncleaned emission" in summary["flags"]


@pytest.mark.casa
@pytest.mark.slow
def test_chunked_run_equals_unchunked(pipeline12m, caplog):
    unchunked = pipeline12m["config"]
    config = fi.ImageConfig.from_name(FIELD, LABEL, kind="12m", config=pipeline12m["cfg"])
    config.rms = unchunked.rms          # one noise level for both, as for small chunks
    chunked = config.duplicate_into_chunks(nchunks=2)
    sizes = [c.chunk.nchan for c in chunked]
    assert len(sizes) == 2 and abs(sizes[0] - sizes[1]) <= 1 and chunked.nchan_total == sum(sizes)
    assert chunked[1].spw.label == LABEL + "_chunk1"
    assert chunked.get_chunk_from_channel(sizes[0]) is chunked[1]
    assert chunked.get_chunk_from_channel(sizes[0] - 1) is chunked[0]
    final = Path(config.run_pipeline(ext="chunked", use_chunking=True, nchunks=2))
    a, ha = _read_fits(pipeline12m["final"])
    b, hb = _read_fits(final)
    assert a.shape == b.shape
    for key in ("BMAJ", "BMIN", "BPA", "CRVAL3", "CDELT3"):
        assert hb[key] == pytest.approx(ha[key], rel=1e-6), key
    finite = np.isfinite(a) & np.isfinite(b)
    assert finite.mean() > 0.99
    difference = np.abs(a - b)[finite]
    assert difference.max() < 0.5 * unchunked.rms, difference.max() / unchunked.rms
    # a re-run of the finished chunked run skips its post-processing (same chunks and settings)
    mtime = final.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="faust_imaging"):
        config.run_pipeline(ext="chunked", use_chunking=True, nchunks=2)
    assert final.stat().st_mtime_ns == mtime
    assert any(r.message.startswith("stage post: reusing") for r in caplog.records)
    # an unchunked run under the same names does not take the chunked products for its own
    full = fi.ImageConfig.from_name(FIELD, LABEL, kind="12m", config=pipeline12m["cfg"])
    base = full.get_imagebase("chunked")
    assert Path(base + ".image.pbcor.common.fits").exists()
    assert full.stages.why_not_current(base, "post", {"ext": "chunked"}).startswith("settings changed")
    # a chunk's own noise estimate (its dirty cube): right for the line-free upper half,
    # biased high for the half holding both lines (why the cookbook sets rms by hand)
    probe = fi.ImageConfig.from_name(FIELD, LABEL, kind="12m", config=pipeline12m["cfg"])
    halves = probe.duplicate_into_chunks(nchunks=2)
    assert fi.get_chunk_rms(halves[1]) == pytest.approx(unchunked.rms, rel=0.2)
    assert fi.get_chunk_rms(halves[0]) > 1.2 * unchunked.rms
    # re-post-processing one chunk reuses the others and gives the same cube
    chunked.postprocess(ext="chunked", use_existing_except=[1])
    c, _ = _read_fits(final)
    assert np.nanmax(np.abs(c - b)) == 0.0


@pytest.mark.slow
def test_job_file_phases_make_the_chunked_cube(pipeline12m, capsys):
    """The phases a job file runs (preprocess; chunks by two workers; postprocess), each its own
    CLI call as in pipe_scripts, give the unchunked cube within half the noise."""
    unchunked = pipeline12m["config"]
    common = [FIELD, LABEL, "-c", str(pipeline12m["cfg"]), "--kind", "12m", "--ext", "phased", "--nchunks", "2",
              "--rms", repr(unchunked.rms), "-q"]
    assert fi.main(["run"] + common + ["--phase", "preprocess"]) == 0
    base = unchunked.get_imagebase("phased")
    assert not Path(base + ".image").exists()                          # preprocess images nothing
    for worker in (1, 0):                                               # any order
        assert fi.main(["run"] + common + ["--phase", "chunks", "--worker", str(worker), "--nworkers", "2"]) == 0
    for index in (0, 1):                                                # each worker made its chunk
        assert Path(base.replace(LABEL, "%s_chunk%d" % (LABEL, index)) + ".image").is_dir()
    assert fi.main(["run"] + common + ["--phase", "postprocess"]) == 0
    a, _ = _read_fits(pipeline12m["final"])
    b, _ = _read_fits(base + ".image.pbcor.common.fits")
    finite = np.isfinite(a) & np.isfinite(b)
    assert a.shape == b.shape and finite.mean() > 0.99
    assert np.abs(a - b)[finite].max() < 0.5 * unchunked.rms
    capsys.readouterr()


def test_unwritable_prod_dir_and_bad_gridder_named(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert fi.main(["run", FIELD, LABEL, "-c", str(write_config(tmp_path)), "-q",
                    "--set", "Paths.PROD_DIR=%s" % (blocker / "prod")]) == 2
    err = capsys.readouterr().err
    assert "cannot write into %s" % (blocker / "prod" / "images") in err and "PROD_DIR" in err
    setups = tmp_path / "setups.csv"
    setups.write_text((ROOT / "configs" / "faust_setups.csv").read_text().replace("mosaic", "mosiac", 1))
    with pytest.raises(fi.InputError, match="joint_gridder 'mosiac' is not a tclean gridder"):
        fi._rows_to_setups(fi._read_csv_rows(setups, fi._SETUP_COLUMNS), setups)


def test_folder_that_is_not_a_measurement_set_named(tmp_path):
    fake = tmp_path / "fake.ms"
    fake.mkdir()
    with pytest.raises(fi.InputError, match="fake.ms matches .* but is not a measurement set"):
        fi._check_measurement_set(fake, FIELD)


@pytest.mark.casa
def test_dataset_kind_selection_and_spw_info(sim12m, tmp_path):
    ms = next((sim12m["root"] / "data").glob("*/*.ms"))
    with pytest.raises(fi.InputError, match="field 'NoSuchField' is not in .*its fields: FAUST_SIM"):
        fi._check_measurement_set(ms, "NoSuchField")
    fi._check_measurement_set(ms, FIELD)
    assert fi.ms_contains_diameter(ms, 12) and not fi.ms_contains_diameter(ms, 7)
    assert fi.ms_dish_diameters(ms) == [12.0]
    with pytest.raises(fi.InputError, match="no 7m measurement set found.*sim12m.ms has dishes of 12 m; use "
                                            "--kind joint"):
        fi.DataSet(FIELD, 9, "7m", config=sim12m["cfg"])
    dset = fi.DataSet(FIELD, 9, "12m", config=sim12m["cfg"])
    assert dset.cell == "0.2800arcsec" and dset.imsize == [120, 120] and dset.pblimit == -0.01
    rows = fi.parse_spw_info_from_ms(ms, setup=9, out_filen=tmp_path / "spw.csv")
    assert len(rows) == 1 and rows[0]["nchan"] == NCHAN and rows[0]["ot_name"] == "CO21"
    catalog_spws = fi._rows_to_spws(fi._read_csv_rows(tmp_path / "spw.csv", fi._SPW_COLUMNS), "x")
    assert len(catalog_spws) == 1


@pytest.mark.casa
def test_7m_pipeline_through_the_cli(tmp_path, capsys):
    from simulate import simulate_alma_line_ms
    ms_dir = tmp_path / "data" / f"{FIELD}-Setup9"
    ms_dir.mkdir(parents=True)
    sim = simulate_alma_line_ms(ms_dir / "sim7m.ms", array="7m", nchan=12, seed=5,
                                vsys_channel=5,
                                sources=__import__("simulate").default_sources()[:1])
    cfg = write_config(tmp_path)
    (tmp_path / "spws.csv").write_text(SPW_CSV.replace(",32,384.5", ",12,384.5"))
    assert fi.main(["run", FIELD, LABEL, "--kind", "7m", "--no-chunked", "-c", str(cfg), "-q"]) == 0
    final = Path(capsys.readouterr().out.strip())
    assert final.name == f"{FIELD}_{LABEL}_7m_natural_clean.image.pbcor.common.fits"
    data, header = _read_fits(final)
    assert header["BUNIT"].lower() == "jy/beam"
    # peak of the compact (unresolved) source within 10 % of the injected peak
    assert np.nanmax(data) == pytest.approx(sim.compact.peak_flux.value, rel=0.10)
    assert fi.main(["clean-up", FIELD, LABEL, "--kind", "7m", "--yes", "-c", str(cfg), "-q"]) == 0
    assert not list((tmp_path / "prod" / "images" / FIELD).glob("*7m*"))


@pytest.mark.casa
@pytest.mark.slow
def test_joint_12m_7m_pipeline(tmp_path):
    """Joint imaging of a 12m and a 7m MS of one field (mosaic gridder, pblimit 0.2)."""
    from simulate import simulate_alma_line_ms
    ms_dir = tmp_path / "data" / f"{FIELD}-Setup9"
    ms_dir.mkdir(parents=True)
    sims = [simulate_alma_line_ms(ms_dir / f"sim{array}.ms", array=array, nchan=NCHAN, seed=seed,
                                  vsys_channel=6, sources=faust_sim_sources())
            for array, seed in (("12m", 3), ("7m", 4))]
    config = fi.ImageConfig.from_name(FIELD, LABEL, kind="joint", config=write_config(tmp_path))
    final = Path(config.run_pipeline(ext="clean", use_chunking=False))
    assert final.name == f"{FIELD}_{LABEL}_joint_natural_clean.image.pbcor.common.fits"
    qa = json.loads(Path(config.get_imagebase("clean") + ".qa.json").read_text())
    assert qa["flags"] == []
    # the joint beam lies between the 12m and the 7m beams
    assert sims[0].beam[0].value < qa["beam"]["major_arcsec"] < sims[1].beam[0].value
    # natural weighting of both arrays (same noise per visibility): the noises combine as
    # 1/sigma^2 = 1/sigma_12m^2 + 1/sigma_7m^2 (measured -8 % here); within 15 %
    expected = 1.0 / math.sqrt(sum(1.0 / s.expected_rms.to_value("Jy/beam") ** 2 for s in sims))
    assert qa["rms_jy_beam"] == pytest.approx(expected, rel=0.15)
    # the compact source is where it was injected, to within a pixel
    data, header = _read_fits(final)
    x0, y0 = _source_pixel(header, sims[0], sims[0].compact)
    peak = np.unravel_index(np.nanargmax(data), data.shape)
    assert math.hypot(peak[2] - x0, peak[1] - y0) <= 1.5


@pytest.mark.parametrize("args, message", [
    (["moments", "--image", "{tmp}/missing.image.common"], "missing.image.common: no such CASA image"),
    (["qa", "--image", "{tmp}/x.image"], "x.image: no such CASA image"),
    (["moments", "CB68"], "no 'CB68_*_clean.image.common' cube in {tmp}/prod/images/CB68"),
    (["qa", "CB68"], "no 'CB68_*_clean.image' cube in {tmp}/prod/images/CB68"),
])
def test_moments_and_qa_name_what_is_missing(args, message, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in args] + ["--set", "Paths.PROD_DIR=%s" % (tmp_path / "prod")]
    assert fi.main(argv) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "prod" / "moments").exists() and not (tmp_path / "prod" / "plots").exists()


def test_moment_window_beyond_the_cube_warns():
    velo = np.linspace(-5.0, 15.0, 41)
    assert not fi._warn_partial_window("c.image.common", velo, 5.0, 4.0)
    with pytest.warns(fi.FaustWarning, match=r"reaches beyond c.image.common's velocities -5.00..15.00"):
        assert fi._warn_partial_window("c.image.common", velo, 13.0, 4.0)


def test_moment_png_has_four_panels_with_beam(tmp_path):
    from astropy.io import fits
    yy, xx = np.mgrid[:40, :50]
    maps = {}
    for name, unit, data in (("mom0", "Jy/beam.km/s", np.exp(-((xx - 25) ** 2 + (yy - 20) ** 2) / 50.0)),
                             ("max", "Jy/beam", np.exp(-((xx - 25) ** 2 + (yy - 20) ** 2) / 50.0)),
                             ("mom1", "km/s", 5.0 + 0.05 * (xx - 25)), ("mom2", "km/s", np.full((40, 50), 0.4))):
        header = fits.Header({"BUNIT": unit, "CDELT1": -1e-5, "CDELT2": 1e-5, "CRPIX1": 25.0, "CRPIX2": 20.0,
                              "BMAJ": 1e-4, "BMIN": 6e-5, "BPA": 30.0, "VSYS": 5.0})
        maps[name] = str(tmp_path / f"m.{name}.fits")
        fits.PrimaryHDU(data.astype(np.float32), header=header).writeto(maps[name])
    out = fi.plot_moment_maps(maps, tmp_path / "m.moments.png", title="test")
    from matplotlib.image import imread
    img = imread(out)
    assert img.shape[0] > 800 and img.shape[1] > 900 and img[..., :3].std() > 0.1


def test_jobs_keep_set_overrides_on_every_line(tmp_path, capsys):
    """A batch run must use the settings of the command that wrote it (the overrides were dropped)."""
    out = tmp_path / "chunks.txt"
    assert fi.main(["jobs", "CB68", "244.936GHz_CS", "--nchunks", "3", "-o", str(out), "-q",
                    "--set", "Paths.prod_dir=%s" % (tmp_path / "prod"), "--set", "Imaging.weighting=1.5"]) == 0
    lines = [l for l in out.read_text().splitlines() if l and not l.startswith("#") and l != "wait"]
    assert len(lines) == 5
    assert all("--set Paths.prod_dir=%s" % (tmp_path / "prod") in l and "--set Imaging.weighting=1.5" in l for l in lines)
    out2 = tmp_path / "setup.txt"
    assert fi.main(["jobs", "CB68", "--setup", "1", "-o", str(out2), "-q", "--set", "Imaging.weighting=1.5"]) == 0
    lines = [l for l in out2.read_text().splitlines() if l and not l.startswith("#")]
    assert lines and all("--set Imaging.weighting=1.5" in l for l in lines)
    # batch runs under CASA MPI: --mpi N on every line that runs tclean
    out3 = tmp_path / "mpi.txt"
    assert fi.main(["jobs", "CB68", "244.936GHz_CS", "--nchunks", "2", "-o", str(out3), "-q", "--mpi", "4"]) == 0
    lines = out3.read_text().splitlines()
    assert [("--mpi 4" in l) for l in lines if "--phase" in l] == [False, True, True, False]
    out4 = tmp_path / "mpisetup.txt"
    assert fi.main(["jobs", "CB68", "--setup", "1", "-o", str(out4), "-q", "--mpi", "2"]) == 0
    assert all(l.endswith("--mpi 2") for l in out4.read_text().splitlines()[1:])


def test_setup_jobfile_and_shell_wrapper(tmp_path):
    jobs = Path(fi.write_setup_jobfile("CB68", 1, tmp_path / "s1.txt", kind="joint"))
    lines = [l for l in jobs.read_text().splitlines() if not l.startswith("#")]
    assert len(lines) == 13 and "233.796GHz_cont" in lines[0]      # continuum first
    assert all(" run CB68 " in l and "--chunked" in l for l in lines)
    assert len(fi.write_setup_jobfile("CB68", 1, tmp_path / "s2.txt", do_cont=False)
               and (tmp_path / "s2.txt").read_text().splitlines()) == 13   # comment + 12
    result = subprocess.run(["bash", str(ROOT / "pipe_scripts" / "faust_jobs.sh"),
                             "--wrapper-opts", "--dry-run -l %s" % (tmp_path / "logs"), "--",
                             "CB68", "244.936GHz_CS", "--nchunks", "3"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = list(tmp_path.glob("faust_jobs_*.txt"))
    assert len(written) == 1 and written[0].read_text().count("--phase chunks") == 3
    bad = subprocess.run(["bash", str(ROOT / "pipe_scripts" / "faust_jobs.sh"), "--", "NoSuch",
                          "--setup", "1"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown field 'NoSuch'" in bad.stderr


@pytest.mark.casa
def test_numpy_smoothing_matches_casa_imsmooth(pipeline12m, tmp_path, monkeypatch):
    """The seed mask's numpy smoothing against CASA imsmooth(targetres=True)."""
    _, casatasks = fi.import_casa()
    image = pipeline12m["config"].nomask_imagebase + ".image"
    data, valid = fi._read_cube(image)
    ours = fi.smooth_cube_to_resolution(data, valid, fi._beams(image), 3.0, fi._cell_arcsec(image))
    casatasks.imsmooth(imagename=image, kernel="gauss", major="3arcsec", minor="3arcsec",
                       pa="0deg", targetres=True, outfile=str(tmp_path / "casa.image"))
    theirs, _ = fi._read_cube(tmp_path / "casa.image")
    inner = (slice(20, -20), slice(20, -20))             # away from the FFT edges
    difference = np.abs(ours[inner] - theirs[inner]).max()
    assert difference < 0.01 * np.abs(theirs[inner]).max(), difference
    # the common-beam products: elliptical target beam, numpy vs imsmooth
    clean = Path(pipeline12m["config"].get_imagebase("clean") + ".image")
    copy = tmp_path / "copy.image"
    shutil.copytree(clean, copy)
    beam = fi.common_beam_of_image(copy)
    a, _ = fi._read_cube(fi.smooth_cube_to_common_beam(str(copy), beam, method="numpy"))
    b, _ = fi._read_cube(fi.smooth_cube_to_common_beam(str(copy), beam, method="imsmooth"))
    assert np.abs(a[inner] - b[inner]).max() < 0.01 * np.abs(b[inner]).max()
    # the default (numpy) streams the cube plane by plane: the same result as the numpy call
    c, _ = fi._read_cube(fi.smooth_cube_to_common_beam(str(copy), beam))
    assert np.array_equal(c, a)
    beams = fi._beams(str(copy) + ".common")
    assert len(beams) == 1 and beams[0][0] == pytest.approx(fi.parse_angle_arcsec(beam["major"]))


@pytest.mark.casa
def test_common_beam_smoothing_keeps_blanked_pixels_blanked(pipeline12m, tmp_path):
    """Pixels masked in the input (e.g. beyond pblimit) stay masked, and export as NaN."""
    _, casatasks = fi.import_casa()
    clean = Path(pipeline12m["config"].get_imagebase("clean") + ".image")
    copy = tmp_path / "masked.image"
    shutil.copytree(clean, copy)
    with fi.ImageManager(copy) as ia:
        mask = ia.getchunk(getmask=True, dropdeg=False)
        mask[:10] = False                                  # blank the first 10 columns
        ia.putregion(pixelmask=mask)
    smoothed = fi.smooth_cube_to_common_beam(str(copy), fi.common_beam_of_image(copy))
    data, valid = fi._read_cube(smoothed)
    assert not valid[:10].any() and valid[20:-20, 20:-20].all()
    casatasks.exportfits(imagename=smoothed, fitsimage=str(tmp_path / "masked.fits"))
    exported = np.squeeze(fits.getdata(tmp_path / "masked.fits"))   # (chan, y, x)
    assert np.isnan(exported[..., :10]).all() and np.isfinite(exported[..., 20:-20]).all()


# ------------------------------------------------- any dataset: add-dataset, geometry
ASKAP_MS_ZIP = ROOT / "tests" / "data" / "askap" / "SB39400.RACS_0635-31.beam0.small.ms.zip"


def test_set_ini_keys_keeps_comments_and_replaces_in_place(tmp_path):
    cfg = tmp_path / "u.cfg"
    cfg.write_text("# my notes\n[Paths]\n# where\nDATA_DIR = /old\nms_files = a.ms,\n    b.ms\n"
                   "[Catalog]\n# targets_file =\n")
    fi.set_ini_keys(cfg, {("Paths", "ms_files"): "c.ms", ("Catalog", "targets_file"): "/t.csv",
                          ("Catalog", "spws_file"): "/s.csv", ("Imaging", "kind"): "12m"})
    text = cfg.read_text()
    assert text.startswith("# my notes\n[Paths]\n# where\nDATA_DIR = /old\nms_files = c.ms\n[Catalog]\n")
    assert "b.ms" not in text and "targets_file = /t.csv" in text and "# targets_file" not in text
    config = fi.load_config(fi.CONFIG_SCHEMA, cfg)
    assert config["Paths"]["ms_files"] == ["c.ms"] and config["Imaging"]["kind"] == "12m"
    assert str(config["Catalog"]["spws_file"]) == "/s.csv"


def test_kinds_bands_and_stale_templattices(tmp_path):
    assert fi.kind_of_diameters([25.0], "other") and not fi.kind_of_diameters([25.0], "12m")
    assert fi.kind_of_diameters([7.0, 12.0], "7m") and not fi.kind_of_diameters([7.0, 12.0], "other")
    assert fi.kind_of_diameters([13.5], "joint")
    assert fi._kinds_of([12.0]) == ["joint", "12m"] and fi._kinds_of([25.0]) == ["joint", "other"]
    assert (fi.alma_band(230.5), fi.alma_band(100.0), fi.alma_band(36.0), fi.alma_band(0.9)) == (6, 3, 1, 0)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in ("TempLattice%d_0" % dead.pid, "TempLattice%d_3" % os.getpid(), "TempLatticeMine",
                 "FAUST_SIM_x.image"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "table.dat").write_text("x")
    removed = fi.remove_stale_templattices(tmp_path)
    assert removed == [str(tmp_path / ("TempLattice%d_0" % dead.pid))]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["TempLattice%d_3" % os.getpid(), "TempLatticeMine", "FAUST_SIM_x.image"])


def test_add_dataset_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    fake = tmp_path / "fake.ms"
    fake.mkdir()
    cfg = tmp_path / "user.cfg"
    assert fi.main(["add-dataset", str(fake), "-c", str(cfg), "-q"]) == 2
    assert "fake.ms was given to add-dataset but is not a measurement set" in capsys.readouterr().err
    assert fi.main(["add-dataset", str(tmp_path / "missing.ms"), "-c", str(cfg), "-q"]) == 2
    assert "missing.ms does not exist" in capsys.readouterr().err
    assert fi.main(["add-dataset", str(fake), "-q"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.ms"]


@pytest.fixture(scope="module")
def askap_ms(tmp_path_factory):
    if casatools is None:
        pytest.skip("casatools is not installed")
    import zipfile
    root = tmp_path_factory.mktemp("askapms")
    with zipfile.ZipFile(ASKAP_MS_ZIP) as archive:
        archive.extractall(root)
    return next(root.glob("*.ms"))


@needs_casa
def test_add_dataset_on_a_real_askap_ms(askap_ms, tmp_path, capsys):
    """A real 36-antenna ASKAP MS (SPW named NO_NAME, no intents, no SOURCE rows): the catalogue
    rows, the geometry (12 m dishes, longest baseline) and the SPW found by frequency."""
    cfg = tmp_path / "user.cfg"
    assert fi.main(["add-dataset", str(askap_ms), "-c", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert out.split() == ["RACS_0635-31", "0.887GHz_spw0"]
    assert "no systemic velocity for RACS_0635-31" in err
    config = fi.get_config(cfg)
    assert config["Paths"]["ms_files"] == [str(askap_ms)]
    catalog = fi.load_catalog(config)
    setup = catalog.setup(4)  # FAUST has setups 1-3
    assert setup.kinds == ("joint", "12m") and setup.joint_gridder == "standard" and setup.band == 0
    assert (setup.low_ghz, setup.high_ghz) == pytest.approx((0.7435, 1.0315), abs=1e-4)
    spw = catalog.spw("0.887GHz_spw0")
    assert (spw.nchan, spw.chan_width, spw.tot_bw, spw.ot_name) == (288, pytest.approx(1000.0), pytest.approx(288.0), "")
    assert catalog.target("RACS_0635-31").res is None
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert fi.main(["add-dataset", str(askap_ms), "-c", str(cfg), "-q"]) == 0     # idempotent
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # geometry from the data, against an independent reading of the MS
    image = fi.ImageConfig.from_name("RACS_0635-31", "0.887GHz_spw0", kind="12m", config=config)
    tb = casatools.table()
    tb.open(str(askap_ms))
    uvw = tb.getcol("UVW")
    tb.close()
    longest_projected = float(np.sqrt((uvw ** 2).sum(axis=0)).max())
    geometry = image.dset.geometry()
    assert geometry["dish_diameter_m"] == 12.0
    assert longest_projected <= geometry["max_baseline_m"] + 1.0 and geometry["max_baseline_m"] > 6000
    lam_high = 299792458.0 / 1.0315e9
    assert geometry["res_arcsec"] == pytest.approx(math.degrees(lam_high / geometry["max_baseline_m"]) * 3600, rel=1e-3)
    pb_fwhm = math.degrees(1.13 * 299792458.0 / 0.7435e9 / 12.0) * 3600
    assert geometry["imsize"][0] == fi.optimum_imsize(2.0 * pb_fwhm / float(image.dset.cell[:-6]))
    assert image.spw_ids == ["0"]
    assert image.scales == [0, 15, 45, 135]                     # 0, 1.5, 4.5, 13.5 beams at 10 px/beam
    assert image.mask_ang_scales == pytest.approx([0.0, 3 * geometry["res_arcsec"], 9 * geometry["res_arcsec"]],
                                                  abs=1e-3)
    assert fi.main(["run", "RACS_0635-31", "0.887GHz_spw0", "-c", str(cfg), "--kind", "7m", "-q",
                    "--set", "Paths.ms_files=" + str(tmp_path / "none.ms")]) == 2
    assert "none.ms does not exist" in capsys.readouterr().err


@needs_casa
def test_add_dataset_then_run_with_geometry_from_the_data(sim12m, tmp_path, capsys):
    """add-dataset on a simulated ALMA 12 m MS kept outside any FIELD-Setup folder, then run the
    printed FIELD LABEL: cell from the longest baseline, image size from the 12 m primary beam."""
    ms = next((sim12m["root"] / "data").glob("*/*.ms"))
    cfg = tmp_path / "user.cfg"
    assert fi.main(["add-dataset", str(ms), "-c", str(cfg), "-q"]) == 0
    field, label = capsys.readouterr().out.split()
    assert field == FIELD and label.endswith("GHz_spw0")
    config = fi.get_config(cfg)
    spw = fi.load_catalog(config).spw(label)
    assert spw.ot_name == "CO21" and spw.nchan == NCHAN
    fast = ["--set", "Imaging.weighting_name=natural", "--set", "Imaging.oversample=4",
            "--set", "Imaging.imsize_pb_factor=1.2", "--set", "Imaging.gain=0.2",
            "--set", "Imaging.cyclefactor=0.5", "--set", "Imaging.scales=0,1,3",
            "--set", "Imaging.scale_upper_limit=2", "--set", "AutoMultithresh.growiterations=75",
            "--set", "AutoMultithresh.fastnoise=true", "--set", "Moments.vwin=3"]
    assert fi.main(["run", field, label, "-c", str(cfg), "--kind", "12m", "--no-chunked", "-q"] + fast) == 0
    final = Path(capsys.readouterr().out.strip())
    header = fits.getheader(final)
    image = fi.ImageConfig.from_name(field, label, kind="12m", config=fi.get_config(
        cfg, Imaging__oversample="4", Imaging__imsize_pb_factor="1.2"))
    geometry = image.dset.geometry()
    assert geometry["max_baseline_m"] == pytest.approx(223.0, abs=3.0)   # the simulator's 12 m layout
    assert abs(header["CDELT2"]) * 3600 == pytest.approx(geometry["cell_arcsec"], rel=1e-3)
    assert header["NAXIS1"] == geometry["imsize"][0]
    # the restored beam is within a factor 1.6 of lambda / B_max (natural weighting is coarser)
    assert 1.0 <= header["BMAJ"] * 3600 / geometry["res_arcsec"] <= 2.2


# ------------------------------------------------------------------- MPI (casampi)
def test_mpi_command_line_and_missing_mpirun(monkeypatch):
    if fi.shutil.which("mpirun") is None and not (Path(sys.executable).parent / "mpirun").exists():
        pytest.skip("mpirun is not installed")
    command = fi.mpi_command(2, ["run", "F", "L", "-c", "x.cfg"])
    assert command[1:4] == ["-n", "3", "--oversubscribe"]
    assert command[-2:] == ["--set", "Imaging.parallel=true"] and "faust_imaging.py" in " ".join(command)
    assert fi._strip_mpi(["run", "F", "--mpi", "2", "L", "--mpi=3"]) == ["run", "F", "L"]
    with pytest.raises(fi.InputError, match="at least 1 server"):
        fi.mpi_command(0, [])
    monkeypatch.setattr(fi.shutil, "which", lambda name: None)
    monkeypatch.setattr(fi.sys, "executable", "/nonexistent/bin/python")
    with pytest.raises(fi.InputError, match="--mpi needs mpirun"):
        fi.find_mpirun()


@needs_casa
def test_concat_parallel_image_makes_a_virtual_cube_paged(pipeline12m, tmp_path):
    image = str(pipeline12m["config"].get_imagebase("clean")) + ".image"
    from casatasks import imsubimage
    halves = []
    for n, chans in enumerate(("0~9", "10~%d" % (NCHAN - 1))):
        halves.append(str(tmp_path / ("half%d.image" % n)))
        imsubimage(imagename=image, outfile=halves[-1], chans=chans)
    ia = casatools.image()
    with fi.ImageManager(halves[0]) as im:
        axis = fi._spectral_index(im)
    virtual = str(tmp_path / "virtual.image")
    ia.imageconcat(outfile=virtual, infiles=halves, axis=axis, relax=True, mode="n").done()
    ia.done()
    assert (Path(virtual) / "imageconcat.json").exists()
    (tmp_path / "virtual.workdirectory").mkdir()
    assert fi.finish_parallel_products(str(tmp_path / "virtual")) == [virtual]
    assert not (Path(virtual) / "imageconcat.json").exists() and not (tmp_path / "virtual.workdirectory").exists()
    for half in halves:
        shutil.rmtree(half)
    with fi.ImageManager(virtual) as im:
        joined = np.asarray(im.getchunk())
    with fi.ImageManager(image) as im:
        original = np.asarray(im.getchunk())
    assert np.array_equal(joined, original)
    assert fi.concat_parallel_image(virtual) is False       # paged already


@needs_casa
@pytest.mark.slow
def test_mpi_run_with_two_servers_equals_the_serial_run(pipeline12m, tmp_path):
    """run --mpi 2 (mpirun -n 3, casampi, tclean parallel=True, seed+multithresh) on the simulated MS:
    the final cube and mask equal the serial run's within the noise."""
    try:
        fi.find_mpirun()
    except fi.InputError as exc:
        pytest.skip(str(exc))
    env = dict(fi.os.environ, CASASITECONFIG=str(ROOT / "configs" / "casasiteconfig.py"))
    result = subprocess.run([sys.executable, str(ROOT / "faust_imaging.py"), "run", FIELD, LABEL, "-c",
                             str(pipeline12m["cfg"]), "--kind", "12m", "--no-chunked", "--mpi", "2",
                             "--set", "Paths.PROD_DIR=%s" % tmp_path],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MPIServer-1" in result.stderr and "MPIServer-2" in result.stderr   # both servers worked
    final = Path(result.stdout.strip().splitlines()[-1])
    assert final.parent.parent.parent == tmp_path and final.exists()
    serial = _read_fits(pipeline12m["final"])[0]
    parallel = _read_fits(final)[0]
    noise = pipeline12m["config"].rms
    assert np.nanmax(np.abs(np.nan_to_num(parallel - serial))) < 0.5 * noise
    mask_serial = fits.getdata(str(pipeline12m["final"]).replace(".image.pbcor.common.fits", ".mask.fits"))
    mask_parallel = fits.getdata(str(final).replace(".image.pbcor.common.fits", ".mask.fits"))
    assert np.mean(mask_serial != mask_parallel) < 0.001
    assert not list(tmp_path.rglob("*.workdirectory")) and not list(tmp_path.rglob("TempLattice*"))


# ------------------------------------------------------- memory-bounded post-processing
@needs_casa
@pytest.mark.slow
def test_post_processing_streams_a_cube_larger_than_the_memory_allowed(tmp_path):
    """An 800 x 800 x 128 cube (328 MB as float32, 655 MB as float64) post-processed (residual check,
    pbcor, common beam, FITS, QA summary, moments) in a process whose address space may grow by only
    250 MB: each step reads one plane at a time.  The control (the whole cube read at once) fails
    under the same limit, so the limit bites."""
    script = ROOT / "tests" / "faust_bigcube.py"
    env = dict(os.environ, CASASITECONFIG=str(ROOT / "configs" / "casasiteconfig.py"), MPLBACKEND="Agg")

    def run(*args):
        return subprocess.run([sys.executable, str(script)] + [str(a) for a in args], capture_output=True,
                              text=True, env=env, timeout=900)

    assert run("make", tmp_path, 800, 128).returncode == 0
    control = run("control", tmp_path, 250)      # casacore aborts (std::bad_alloc) or numpy raises
    assert control.returncode != 0 or '"MemoryError"' in control.stdout, control.stdout
    assert "bad_alloc" in control.stderr or "MemoryError" in control.stdout
    result = run("post", tmp_path, 250)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["nchan"] == 128
    assert summary["residual_rms"] == pytest.approx(0.01, rel=0.02)         # the injected noise
    assert 0.4 < summary["peak"] < 0.6 and summary["mom_max_peak"] == pytest.approx(summary["peak"])
    assert (tmp_path / "big.image.pbcor.common.fits").stat().st_size > 300e6
    assert len(list((tmp_path / "moments").glob("big.*.fits"))) == 9


@needs_casa
def test_residual_noise_guard_on_a_real_askap_snapshot(askap_ms, tmp_path, caplog, monkeypatch):
    """The real ASKAP snapshot (36 antennas, 3 integrations: ~2000 visibilities per channel for a
    384 x 384 image) with three point sources and 0.05 Jy/visibility noise painted in: the unmasked
    clean fits the noise itself (its residual rms falls >1000x below the thermal noise), so that
    residual must not set the thresholds (it did: each iteration lowered them 1000x)."""
    from simulate_faust import paint_sources
    ms = tmp_path / "painted.ms"
    shutil.copytree(askap_ms, ms)
    paint_sources(ms)
    cfg = tmp_path / "askap.cfg"
    fi.add_dataset([ms], cfg)
    monkeypatch.setattr(fi.log, "propagate", True)     # an earlier main() call turned it off
    config = fi.get_config(cfg, Imaging__oversample="3", Imaging__imsize_pb_factor="0.15",
                           Imaging__line_vwin="3000km/s", Imaging__weighting_name="natural",
                           Imaging__gain="0.2", Imaging__cyclefactor="1", Imaging__scales="0, 1, 3")
    image = fi.ImageConfig.from_name("RACS_0635-31", "0.887GHz_spw0", fullcube=False, config=config)
    image.make_dirty_cube()
    dirty = image.rms
    thermal = 0.05 / math.sqrt(2 * 1998)          # natural weighting, XX and YY, one channel
    assert 0.7 * thermal < dirty < 1.5 * thermal
    with caplog.at_level("WARNING", logger="faust_imaging"):
        image.clean_line_nomask(sigma=4.5)
    marker = json.loads(Path(image.nomask_imagebase + ".nomask.done.json").read_text())
    assert marker["rms_rejected"] < 0.01 * dirty                 # what clean left: not noise
    assert marker["rms_used"] == pytest.approx(dirty) and marker["rms_residual"] == []
    assert any("clean modelled the noise itself" in r.getMessage() for r in caplog.records)
