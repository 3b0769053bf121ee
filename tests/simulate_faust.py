"""FAUST imaging set-up on simulated data, shared by tests/test_faust_imaging.py and the demo.

A simulated field ``FAUST_SIM`` (not one of the programme's targets) in a made-up
Setup 9 holding one spectral window around CO 2-1, with a configuration that points the
pipeline at a DATA_DIR of simulated measurement sets (see ``tests/simulate.py``).
"""
import math
from dataclasses import replace as dataclass_replace
from pathlib import Path

__all__ = ["FIELD", "LABEL", "NCHAN", "SETUP_CSV", "SPW_CSV", "faust_sim_sources",
           "write_config", "paint_sources", "run_demo"]

FIELD, LABEL = "FAUST_SIM", "230.538GHz_CO"
SETUP_CSV = ("setup,band,low_ghz,high_ghz,kinds,joint_gridder,nchunks_line,nchunks_cont\n"
             "9,6,230.4,230.6,joint;12m;7m,mosaic,2,2\n")
SPW_CSV = ("setup,restfreq_ghz,mol_name,name,ms_restfreq,spw_id,ot_name,nchan,chan_width_khz,tot_bw_mhz\n"
           "9,230.538,CO,CO_2_1,230.538GHz,0,CO21,32,384.5,12.3\n")


NCHAN = 32


def faust_sim_sources():
    """A compact core (0.3 Jy line peak) and a 3" x 2" clump (0.4 Jy), 6 channels apart.

    Faint enough that most channels of the 32 are noise dominated, as in real FAUST cubes
    (the rms comes from the dirty cube), bright enough for a 4 % flux measurement.
    """
    import astropy.units as u
    from simulate import default_sources
    compact, extended = default_sources()
    return (dataclass_replace(compact, peak_flux=0.3 * u.Jy),
            dataclass_replace(extended, peak_flux=0.4 * u.Jy))



def write_config(root, data_dir=None, extra=""):
    """A test configuration for the simulated field (returns the cfg path)."""
    root = Path(root)
    (root / "setups.csv").write_text(SETUP_CSV)
    (root / "spws.csv").write_text(SPW_CSV)
    cfg = root / "faust.cfg"
    cfg.write_text(f"""[Paths]
DATA_DIR = {data_dir or root / 'data'}
PROD_DIR = {root / 'prod'}
ms_pattern = {{field}}-Setup{{setup}}/*.ms
[Catalog]
setups_file = {root / 'setups.csv'}
spws_file = {root / 'spws.csv'}
extra_targets = {FIELD}:1.4:5.85
[Imaging]
weighting_name = natural
oversample = 5
imsize_pb_factor = 1.2
scales = 0, 1, 3
scale_upper_limit = 2
mask_scales = 0, 2, 3.5
gain = 0.2
cyclefactor = 0.5
[AutoMultithresh]
growiterations = 75
fastnoise = true
{extra}
""")
    return cfg


def paint_sources(ms, noise_jy=0.05):
    """Unflag the real MS and replace its DATA by three point sources (1, 0.5, 0.3 Jy near the
    phase centre) plus Gaussian noise: the real array, uv coverage and frequencies, a known sky.
    (The MS as shipped is fully flagged, its DATA zero or NaN: a format fixture.)"""
    import casatasks
    import casatools
    casatasks.flagdata(vis=str(ms), mode="unflag", flagbackup=False)
    msmd = casatools.msmetadata()
    msmd.open(str(ms))
    centre = msmd.phasecenter(0)
    msmd.close()
    ra, dec = centre["m0"]["value"], centre["m1"]["value"]
    me, cl = casatools.measures(), casatools.componentlist()
    for dra, ddec, flux in ((0, 0, 1.0), (300, 200, 0.5), (-600, -400, 0.3)):
        cl.addcomponent(dir=me.direction("J2000", "%.10frad" % (ra + dra / 206264.806 / math.cos(dec)),
                                         "%.10frad" % (dec + ddec / 206264.806)),
                        flux=flux, fluxunit="Jy", freq="887.5MHz", shape="point")
    cl.rename(str(ms) + ".cl")
    cl.close()
    sm = casatools.simulator()
    sm.openfromms(str(ms))
    sm.predict(complist=str(ms) + ".cl", incremental=False)
    sm.setnoise(mode="simplenoise", simplenoise="%gJy" % noise_jy)
    sm.corrupt()
    sm.done()


def run_demo(outdir):
    """Simulate a 12 m MS, run the whole pipeline, moments and QA; return a summary.

    The products land in ``outdir/prod`` under the pipeline's usual names; the summary
    compares the recovered line velocity and noise with what was injected.
    """
    import json

    import faust_imaging as fi
    from simulate import simulate_alma_line_ms

    root = Path(outdir)
    ms_dir = root / "data" / f"{FIELD}-Setup9"
    ms_dir.mkdir(parents=True, exist_ok=True)
    sim = simulate_alma_line_ms(ms_dir / "sim12m.ms", array="12m", nchan=NCHAN, seed=3,
                                vsys_channel=6, sources=faust_sim_sources())
    cfg = write_config(root)
    config = fi.ImageConfig.from_name(FIELD, LABEL, kind="12m", config=cfg)
    final = Path(config.run_pipeline(ext="clean", use_chunking=False))
    fi.make_all_moment_maps(FIELD, ext="clean", config=cfg)
    fi.make_all_qa_plots(FIELD, ext="clean", config=cfg)
    qa = json.loads(Path(config.get_imagebase("clean") + ".qa.json").read_text())
    return {"final_cube": str(final), "moments": len(list(root.rglob("moments/*.fits"))),
            "qa_plots": len(list(root.rglob("*.png"))), "qa_flags": qa.get("flags"),
            "peak_snr": round(float(qa["peak_snr"]), 1),
            "max_residual_sigma": round(float(qa["max_residual_sigma"]), 2),
            "rms_mJy_per_beam": {"pipeline": round(1e3 * float(qa["rms_jy_beam"]), 3),
                                 "expected": round(1e3 * float(sim.expected_rms.to_value("Jy/beam")), 3)}}
