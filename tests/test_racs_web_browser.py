"""The review website end to end in headless Chromium, on SQLite and on PostgreSQL.

The pipeline demo writes a fresh database; the site is migrated, a user created and the
site served with the real command line (``racs_pipeline.py web ...``, waitress); then the
system Chromium (Debian ``chromium``, driven by Playwright, ``--no-sandbox``) logs in,
opens the run, filters the candidates, tags one with its hotkey (which moves on to the
next), comes back with the arrow key, reloads and finds the tag persisted.  Screenshots
of every step are saved in the test's tmp dir.  Cone searches of both databases must
give the rows a brute-force search of the pipeline's own table gives.
"""
import os
from pathlib import Path

import pytest

import racs_pipeline as racs
import simulate_racs as sim_mod

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _chromium():
    path = sim_mod.chromium_executable()
    if path is None:
        message = "no Chromium: install the Debian package chromium (make test does it as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    pytest.importorskip("playwright.sync_api")
    return path


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request, tmp_path_factory):
    """The pipeline demo in a fresh database, migrated, with users, served on 127.0.0.1."""
    browser_path = _chromium()
    tmp_path = tmp_path_factory.mktemp("web_" + request.param)
    dropper = None
    if request.param == "postgresql":
        import sqlalchemy as sa
        pg_url = request.getfixturevalue("pg_url")
        name = "racs_browser_%d" % os.getpid()
        admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name))
            conn.execute(sa.text('CREATE DATABASE "%s"' % name))
        url = pg_url.rsplit("/", 1)[0] + "/" + name

        def drop():
            with admin.connect() as conn:
                conn.execute(sa.text('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name))
            admin.dispose()
        dropper = drop
    else:
        url = "sqlite:///%s" % (tmp_path / "review.sqlite")
    demo = sim_mod.run_demo(tmp_path / "demo", db_url=url)
    assert demo["exit_code"] == 0 and demo["scoring"]["false_candidates"] == 0
    env = sim_mod.web_environment(tmp_path)
    sim_mod.web_setup(url, env)
    with sim_mod.WebServer(url, env, log_path=tmp_path / "serve.log") as server:
        yield {"server": server, "url": url, "demo": demo, "browser": browser_path, "shots": tmp_path,
               "backend": request.param}
    if dropper is not None:
        dropper()


def test_vetting_in_a_real_browser(served):
    from playwright.sync_api import expect, sync_playwright
    base, shots = served["server"].url, served["shots"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=served["browser"], args=sim_mod.CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(base)
        assert "/accounts/login/" in page.url                       # no browsing without a login
        sim_mod.browser_login(page, base)
        page.screenshot(path=str(shots / "1_runs.png"), full_page=True)
        page.click("#runs a >> nth=0")
        expect(page.locator("h1")).to_contain_text("Run ")
        page.click("text=Candidates")
        page.select_option("#id_transient_type", "noaskapmatch")
        page.click("#apply")
        rows = page.locator("a.source-link")
        expect(rows).to_have_count(3)                               # the three vanished sources
        page.screenshot(path=str(shots / "2_candidates.png"), full_page=True)
        first = rows.nth(0).inner_text()
        second = rows.nth(1).inner_text()
        rows.nth(0).click()
        expect(page.locator("h1")).to_contain_text(first)
        page.screenshot(path=str(shots / "3_source.png"), full_page=True)
        page.keyboard.press("i")                                    # tag "investigate" ...
        page.wait_for_url("**/source/%s/**" % second)               # ... and move on to the next
        expect(page.locator(".messages")).to_contain_text("%s tagged investigate" % first)
        page.screenshot(path=str(shots / "4_next.png"), full_page=True)
        page.keyboard.press("ArrowLeft")
        page.wait_for_url("**/source/%s/**" % first)
        page.reload()
        expect(page.locator("#current-tag")).to_have_text("investigate: investigate")
        page.screenshot(path=str(shots / "5_persisted.png"), full_page=True)
        page.keyboard.press("ArrowRight")
        page.wait_for_url("**/source/%s/**" % second)
        listing = page.request.get(base + "query/?usertag=investigate&format=csv")   # the browser's session
        lines = listing.text().strip().splitlines()
        assert len(lines) == 2 and first in lines[1]
        browser.close()
    for name in ("1_runs", "2_candidates", "3_source", "4_next", "5_persisted"):
        assert (shots / ("%s.png" % name)).stat().st_size > 10_000


def test_cone_search_gives_the_pipeline_rows(served):
    from astropy.coordinates import SkyCoord
    from playwright.sync_api import sync_playwright
    results = next(Path(served["demo"]["output_dir"]).glob("*_results"))
    master = racs.read_table(results / "transients" / "transients_master.csv")
    centre = master.iloc[len(master) // 2]
    sep = SkyCoord(master["ra"], master["dec"], unit="deg").separation(
        SkyCoord(centre["ra"], centre["dec"], unit="deg")).arcmin
    expected = sorted(master.loc[sep <= 8.0, "master_name"])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=served["browser"], args=sim_mod.CHROMIUM_ARGS)
        page = browser.new_page()
        sim_mod.browser_login(page, served["server"].url)
        answer = page.request.get(served["server"].url + "query/?cone_ra=%.6f&cone_dec=%.6f&cone_radius=8&cone_unit=arcmin"
                           "&format=csv" % (centre["ra"], centre["dec"]))
        names = sorted(line.split(",")[1] for line in answer.text().strip().splitlines()[1:])
        browser.close()
    assert names == expected and len(names) >= 3, served["backend"]
