"""The review website (racs_web) with Django's test client, on a real pipeline database.

One module-wide SQLite database: two pipeline runs on simulated fields (real AegeanTools,
stamps), the site's migrations, three users (ada staff, bob and cy not).  Every view,
permission rule, bad input and the Slack hook (a fake endpoint on 127.0.0.1) is
exercised; the browser test (tests/test_racs_web_browser.py) covers the same flows in
headless Chromium against SQLite and PostgreSQL.
"""
import http.server
import json
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

import racs_pipeline as racs
import simulate_racs as sim_mod

PASSWORD = "vetting-2026"


class _FakeSlack(http.server.BaseHTTPRequestHandler):
    received = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _FakeSlack.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two runs in one SQLite database, migrated, with users; Django configured for it."""
    pytest.importorskip("django")
    root = tmp_path_factory.mktemp("racs_web")
    url = "sqlite:///%s" % (root / "racs.sqlite")
    sim = sim_mod.simulate_field(root / "field", size=500, n_faint=10, n_bright=30, n_transients=3)
    parset = sim_mod.write_parset(sim, root / "parset.in", overlays=False, stamps=True)
    assert racs.main(["process", "-q", "-c", str(parset), "--db-url", url, "--postage-stamp-selection", "all",
                      str(sim["image"])]) == 0
    shutil.copy(sim["image"], root / "field" / "second_epoch.fits")
    assert racs.main(["process", "-q", "-c", str(parset), "--db-url", url, "--db-tag", "second",
                      "--postage-stamps", "false", str(root / "field" / "second_epoch.fits")]) == 0
    slack = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeSlack)
    threading.Thread(target=slack.serve_forever, daemon=True).start()
    os.environ["RACS_WEB_SECRET_KEY"] = "test-only-" + "k" * 40
    import racs_web
    options = racs_web.WebOptions(slack_webhook_url="http://127.0.0.1:%d/hook" % slack.server_address[1],
                                  base_url="http://racs.example.org", page_size=20)
    racs_web.migrate(url, options)
    from django.test.utils import setup_test_environment
    setup_test_environment()
    users = {"ada": racs_web.create_user(url, "ada", PASSWORD, staff=True),
             "bob": racs_web.create_user(url, "bob", PASSWORD),
             "cy": racs_web.create_user(url, "cy", PASSWORD)}
    from racs_web.review.models import Image
    first, second = Image.objects.order_by("id")
    yield {"url": url, "sim": sim, "options": options, "users": users, "first": first, "second": second,
           "root": root, "parset": parset}
    slack.shutdown()


def client(site, user=None, csrf=False):
    from django.test import Client
    c = Client(enforce_csrf_checks=csrf)
    if user:
        c.force_login(site["users"][user])
    return c


def candidates(site, image):
    from racs_web.review.models import Crossmatch
    from racs_web.review.queries import candidate_q
    return Crossmatch.objects.filter(image_id=image.id).filter(candidate_q()).order_by("-ratio", "id")


# ---------------------------------------------------------------------------
# the pipeline's tables and the models
# ---------------------------------------------------------------------------
def test_models_match_the_pipeline_tables(site):
    from racs_web.review import models
    db = racs.RacsDatabase(site["url"])
    kinds = {"TEXT": "TextField", "FLOAT": "FloatField", "INTEGER": "IntegerField", "BOOLEAN": "BooleanField"}
    for table, model in ((db.images, models.Image), (db.sources, models.Source),
                         (db.crossmatches, models.Crossmatch), (db.transients, models.Transient)):
        assert model._meta.db_table == table.name and not model._meta.managed
        fields = {f.column: f for f in model._meta.concrete_fields}
        for column in table.columns:
            assert column.name in fields, "%s.%s has no model field" % (table.name, column.name)
            field = fields[column.name]
            if column.name == "id":
                continue
            if column.foreign_keys:
                assert field.is_relation, column.name
                continue
            expected = kinds[column.type.compile(dialect=db.engine.dialect).split("(")[0]]
            assert type(field).__name__ == expected, "%s.%s: %s vs %s" % (table.name, column.name,
                                                                          type(field).__name__, expected)
        assert set(fields) == {c.name for c in table.columns}, table.name


def test_reinjection_keeps_the_run_id(site):
    from racs_web.review.models import Image, Tag
    before = Image.objects.get(pk=site["second"].id)
    tag = Tag.objects.create(image_id=before.id, master_name="X", usertag="help", userreason="not sure",
                             user=site["users"]["bob"])
    assert racs.main(["process", "-q", "-c", str(site["parset"]), "--db-url", site["url"], "--db-tag", "second",
                      "--postage-stamps", "false", str(site["root"] / "field" / "second_epoch.fits")]) == 0
    after = Image.objects.get(name="second_epoch.fits")
    assert after.id == before.id and after.runtime >= before.runtime
    tag.delete()


# ---------------------------------------------------------------------------
# access: login, no sign-up, CSRF, settings
# ---------------------------------------------------------------------------
def test_anonymous_users_are_sent_to_the_login(site):
    first = site["first"]
    c = client(site)
    for path in ("/", "/run/%d/" % first.id, "/run/%d/crossmatches/" % first.id, "/query/", "/search/"):
        response = c.get(path)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/?next="), path
    name = candidates(site, first)[0].master_name
    response = c.post("/run/%d/source/%s/tag/" % (first.id, name), {"usertag": "help", "userreason": "not sure"})
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    assert c.get("/accounts/signup/").status_code == 404
    site["options"].public_read = True
    try:
        assert c.get("/").status_code == 200                      # read-only browsing by a setting
        assert c.post("/run/%d/claim/" % first.id).status_code == 302          # still no changes
    finally:
        site["options"].public_read = False


def test_login_logout_and_password_change(site):
    from django.test import Client
    c = Client()
    response = c.post("/accounts/login/", {"username": "cy", "password": "wrong"})
    assert response.status_code == 200 and b"correct username and password" in response.content
    response = c.post("/accounts/login/", {"username": "cy", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/"
    assert c.get("/").status_code == 200
    response = c.post("/accounts/password_change/", {"old_password": PASSWORD, "new_password1": "another-pass-9",
                                                     "new_password2": "another-pass-9"})
    assert response.status_code == 302
    assert c.post("/accounts/logout/").status_code == 302 and c.get("/").status_code == 302
    assert c.login(username="cy", password="another-pass-9")
    user = site["users"]["cy"]
    user.set_password(PASSWORD)
    user.save()


def test_missing_csrf_token_is_forbidden(site):
    first = site["first"]
    name = candidates(site, first)[0].master_name
    c = client(site, "bob", csrf=True)
    response = c.post("/run/%d/source/%s/tag/" % (first.id, name), {"usertag": "help", "userreason": "not sure"})
    assert response.status_code == 403 and b"CSRF" in response.content
    assert c.get("/hotkeys/").status_code == 405                  # state changes are POST only


def test_security_settings_and_secret_key(site, tmp_path, monkeypatch):
    from django.conf import settings
    import racs_web
    assert settings.DEBUG is False and settings.ALLOWED_HOSTS[:2] == ["127.0.0.1", "localhost"]
    assert settings.SECRET_KEY.startswith("test-only-") and settings.X_FRAME_OPTIONS == "DENY"
    monkeypatch.delenv("RACS_WEB_SECRET_KEY")
    path = tmp_path / "cfg" / "secret_key"
    key = racs_web.secret_key(path)
    assert len(key) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert racs_web.secret_key(path) == key                          # made once
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    racs_web.secret_key()
    assert (tmp_path / "xdg" / "racs_web" / "secret_key").is_file()
    with pytest.raises(racs_web.WebError, match="supports sqlite and postgresql"):
        racs_web.database_settings("mysql://u@h/db")


# ---------------------------------------------------------------------------
# pages
# ---------------------------------------------------------------------------
def test_home_lists_runs_with_counts_and_csv(site):
    c = client(site, "bob")
    response = c.get("/")
    assert response.status_code == 200
    text = response.content.decode()
    n_cand = candidates(site, site["first"]).count()
    assert "askap_sim.fits" in text and "second_epoch.fits" in text and ">%d</a>" % n_cand in text
    csv = c.get("/?format=csv")
    lines = b"".join(csv.streaming_content).decode().strip().splitlines()
    assert lines[0].startswith("id,name,tag,ra,dec") and len(lines) == 3
    assert lines[1].split(",")[10] == str(n_cand)


def test_run_page_plots_and_404s(site):
    first = site["first"]
    c = client(site, "bob")
    response = c.get("/run/%d/" % first.id)
    assert response.status_code == 200 and b"Diagnostic plots" in response.content
    plot = c.get("/run/%d/plot/0/" % first.id)
    assert plot.status_code == 200 and plot["Content-Type"] == "image/png"
    assert b"".join(plot.streaming_content)[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get("/run/%d/plot/999/" % first.id).status_code == 404
    assert c.get("/run/99999/").status_code == 404
    assert c.get("/run/%d/source/NO_SUCH_SOURCE/" % first.id).status_code == 404
    for bad in ("..%2F..%2Fetc%2Fpasswd", "../../etc/passwd"):
        assert c.get("/run/%d/source/%s/stamp/" % (first.id, bad)).status_code == 404


def test_candidate_filter_and_sorting(site):
    first = site["first"]
    c = client(site, "bob")
    response = c.get("/run/%d/crossmatches/" % first.id, {"show": "candidates"})
    assert response.status_code == 200
    rows = response.context["rows"]
    expected = list(candidates(site, first).values_list("master_name", flat=True))
    assert [r.master_name for r in rows] == expected[:20] and len(expected) >= 9
    assert all(r.pipelinetag == "Good" and r.vs >= 4.3 and abs(r.m) >= 1.2 for r in rows)
    response = c.get("/run/%d/crossmatches/" % first.id, {"sort": "-askap_flux", "transient_type": "match",
                                                          "askap_flux_min": "100"})
    fluxes = [r.askap_iflux for r in response.context["rows"]]
    assert fluxes == sorted(fluxes, reverse=True) and min(fluxes) >= 0.1
    csv = c.get("/run/%d/crossmatches/" % first.id, {"show": "candidates", "format": "csv"})
    lines = b"".join(csv.streaming_content).decode().strip().splitlines()
    assert len(lines) == len(expected) + 1 and lines[0].startswith("image_id,master_name")


def test_bad_filter_values_are_form_errors(site):
    c = client(site, "bob")
    for params, message in (({"ratio_min": "abc"}, b"Enter a number"),
                            ({"cone_ra": "12:xx:00", "cone_dec": "-35", "cone_radius": "10"}, b"is not a right ascension"),
                            ({"cone_ra": "10", "cone_dec": "-95", "cone_radius": "10"}, b"outside -90..90"),
                            ({"cone_ra": "10"}, b"a cone search needs RA, Dec and a radius"),
                            ({"show": "everything"}, b"Select a valid choice"),
                            ({"vs_min": "nan"}, b"Enter a number"),
                            ({"image": "-3"}, b"greater than or equal to 1")):
        response = c.get("/query/", params)
        assert response.status_code == 400 and message in response.content, params


def test_sql_injection_strings_change_nothing(site):
    from racs_web.review.models import Crossmatch, Image
    c = client(site, "bob")
    before = (Crossmatch.objects.count(), Image.objects.count())
    nasty = ["' OR 1=1 --", "x'); DROP TABLE racs_crossmatches; --", "\" OR \"\"=\"", "1; SELECT * FROM auth_user"]
    from racs_web.review.forms import CrossmatchFilterForm
    every_filter = list(CrossmatchFilterForm.base_fields)
    assert len(every_filter) >= 35
    for value in nasty:
        for field in every_filter:
            response = c.get("/query/", {field: value})
            assert response.status_code in (200, 400), (field, value)
            if response.status_code == 200:
                assert response.context["total"] == 0, (field, value)
            assert b"pbkdf2" not in response.content and b"Traceback" not in response.content
        assert c.get("/search/", {"user": value}).status_code == 200
    assert (Crossmatch.objects.count(), Image.objects.count()) == before


def test_cone_search_matches_brute_force(site):
    from astropy.coordinates import SkyCoord
    from racs_web.review.models import Crossmatch
    c = client(site, "bob")
    centre = Crossmatch.objects.filter(image_id=site["first"].id).order_by("id")[3]
    everything = list(Crossmatch.objects.values_list("master_name", "image_id", "ra", "dec"))
    sep = SkyCoord([e[2] for e in everything], [e[3] for e in everything], unit="deg").separation(
        SkyCoord(centre.ra, centre.dec, unit="deg")).arcmin
    expected = sorted((e[0], e[1]) for e, s in zip(everything, sep) if s <= 6.0)
    ra_text = SkyCoord(centre.ra, centre.dec, unit="deg").ra.to_string("hourangle", sep=":", precision=3)
    for ra, unit, radius in ((str(centre.ra), "arcmin", "6"), (ra_text, "deg", "0.1")):
        response = c.get("/query/", {"cone_ra": ra, "cone_dec": str(centre.dec), "cone_radius": radius,
                                     "cone_unit": unit, "sort": "id", "format": "csv"})
        assert response.status_code == 200
        lines = b"".join(response.streaming_content).decode().strip().splitlines()[1:]
        found = sorted((line.split(",")[1], int(line.split(",")[0])) for line in lines)
        assert found == expected and len(found) >= 2      # this run and the second epoch


def test_source_page_stamp_neighbours_and_other_runs(site):
    first = site["first"]
    c = client(site, "bob")
    listing = c.get("/run/%d/crossmatches/" % first.id, {"show": "candidates"})
    rows, query = listing.context["rows"], listing.context["query"]
    response = c.get("/run/%d/source/%s/" % (first.id, rows[1].master_name), {"q": query, "i": 1})
    assert response.status_code == 200
    assert response.context["before"].master_name == rows[0].master_name
    assert response.context["after"].master_name == rows[2].master_name
    others = list(response.context["others"])
    assert [o.image_id for o in others] == [site["second"].id]     # the same source in the other run
    stamp = c.get("/run/%d/source/%s/stamp/" % (first.id, rows[1].master_name))
    assert stamp.status_code == 200 and stamp["Content-Type"] == "image/jpeg"
    text = response.content.decode()
    assert "simbad.cds.unistra.fr" in text and "ned.ipac.caltech.edu" in text and 'id="copy-coords"' in text


# ---------------------------------------------------------------------------
# vetting: tags, claims, comments
# ---------------------------------------------------------------------------
def test_tags_first_tagger_staff_only_and_history(site):
    from racs_web.review.models import Tag, TagEvent
    first = site["first"]
    name = candidates(site, first)[2].master_name
    url = "/run/%d/source/%s/tag/" % (first.id, name)
    bob, cy, ada = client(site, "bob"), client(site, "cy"), client(site, "ada")
    assert bob.post(url, {"usertag": "ignore", "userreason": "is match"}).status_code == 302
    assert Tag.objects.get(image_id=first.id, master_name=name).user.username == "bob"
    response = cy.post(url, {"usertag": "problem", "userreason": "too noisy"}, follow=True)
    assert b"bob tagged %s as ignore (is match) first" % name.encode() in response.content
    tag = Tag.objects.get(image_id=first.id, master_name=name)
    assert (tag.usertag, tag.userreason, tag.user.username) == ("ignore", "is match", "bob")
    assert bob.post(url, {"usertag": "transient", "userreason": "transient"}).status_code == 403   # staff only
    assert bob.post(url, {"usertag": "problem", "userreason": "edge of field"}).status_code == 302
    assert bob.post(url, {"usertag": "ignore", "userreason": "not a reason"}, follow=True).status_code == 200
    assert Tag.objects.get(image_id=first.id, master_name=name).userreason == "edge of field"
    events = list(TagEvent.objects.filter(image_id=first.id, master_name=name).values_list("user__username", "action"))
    assert events == [("bob", "set"), ("bob", "change")]
    other = candidates(site, first)[3].master_name
    assert ada.post("/run/%d/source/%s/tag/" % (first.id, other),
                    {"usertag": "transient", "userreason": "transient"}).status_code == 302
    assert Tag.objects.get(image_id=first.id, master_name=other).usertag == "transient"
    assert bob.post(url, {"usertag": ""}).status_code == 302                                       # clear
    assert not Tag.objects.filter(image_id=first.id, master_name=name).exists()
    listing = bob.get("/query/", {"usertag": "transient"})
    assert [r.master_name for r in listing.context["rows"]] == [other]
    assert bob.get("/run/%d/crossmatches/" % first.id, {"checkedby": "ada"}).context["total"] == 1


def test_claims_decide_who_may_tag(site):
    second = site["second"]
    name = candidates(site, second)[0].master_name
    ada, bob, cy = client(site, "ada"), client(site, "bob"), client(site, "cy")
    assert cy.post("/run/%d/claim/" % second.id).status_code == 302
    response = bob.post("/run/%d/claim/" % second.id, follow=True)
    assert b"claimed by cy already" in response.content
    assert bob.post("/run/%d/source/%s/tag/" % (second.id, name),
                    {"usertag": "help", "userreason": "not sure"}).status_code == 403
    assert cy.post("/run/%d/source/%s/tag/" % (second.id, name),
                   {"usertag": "help", "userreason": "not sure"}).status_code == 302
    assert bob.post("/run/%d/unclaim/" % second.id).status_code == 403
    assert ada.post("/run/%d/unclaim/" % second.id).status_code == 302                       # staff may
    home = bob.get("/")
    assert "unclaimed" in home.content.decode()


def test_comments_and_replies(site):
    from racs_web.review.models import Comment
    first = site["first"]
    name = candidates(site, first)[0].master_name
    bob = client(site, "bob")
    assert bob.post("/run/%d/comment/" % first.id, {"title": "Run note", "text": "RFI at the edge"}).status_code == 302
    assert bob.post("/run/%d/comment/" % first.id, {"title": "Candidate", "text": "looks real",
                                                    "master_name": name}).status_code == 302
    parent = Comment.objects.get(title="Candidate")
    assert client(site, "cy").post("/run/%d/comment/" % first.id, {
        "title": "Re", "text": "agreed", "master_name": name, "parent": parent.id}).status_code == 302
    page = bob.get("/run/%d/source/%s/" % (first.id, name)).content.decode()
    assert "looks real" in page and "agreed" in page and "reply to #%d" % parent.id in page
    assert "RFI at the edge" in bob.get("/run/%d/" % first.id).content.decode()
    assert bob.post("/run/%d/comment/" % first.id, {"title": "", "text": ""}, follow=True).status_code == 200
    assert bob.post("/run/%d/comment/" % first.id, {"title": "x", "text": "y",
                                                    "master_name": "NOT_HERE"}).status_code == 404
    assert client(site).post("/run/%d/comment/" % first.id, {"title": "a", "text": "b"}).status_code == 302


def test_tag_search_and_vetted_csv(site):
    from racs_web.review.models import Tag
    first = site["first"]
    name = candidates(site, first)[4].master_name
    client(site, "cy").post("/run/%d/source/%s/tag/" % (first.id, name), {"usertag": "investigate",
                                                                            "userreason": "investigate"})
    bob = client(site, "bob")
    response = bob.get("/search/", {"usertag": "investigate"})
    assert response.status_code == 200 and name in response.content.decode()
    csv = bob.get("/search/", {"user": "cy", "format": "csv"})
    lines = b"".join(csv.streaming_content).decode().strip().splitlines()
    assert lines[0] == "image_id,master_name,usertag,userreason,user,updated"
    assert len(lines) - 1 == Tag.objects.filter(user__username="cy").count()
    assert bob.get("/search/", {"usertag": "nonsense"}).status_code == 400


def test_hotkeys_switch_per_session(site):
    first = site["first"]
    name = candidates(site, first)[0].master_name
    bob = client(site, "bob")
    page = "/run/%d/source/%s/" % (first.id, name)
    assert b"racsHotkeys()" in bob.get(page).content
    assert bob.post("/hotkeys/", {"back": page}).status_code == 302
    assert b"racsHotkeys()" not in bob.get(page).content and b"hotkeys off" in bob.get(page).content
    bob.post("/hotkeys/", {"back": "https://evil.example.org/"})
    assert bob.post("/hotkeys/", {"back": "https://evil.example.org/"})["Location"] == "/"   # no open redirect


def test_send_to_slack(site):
    first = site["first"]
    row = candidates(site, first)[0]
    bob = client(site, "bob")
    _FakeSlack.received.clear()
    response = bob.post("/run/%d/source/%s/slack/" % (first.id, row.master_name), follow=True)
    assert b"Sent %s to Slack" % row.master_name.encode() in response.content
    message = _FakeSlack.received[-1]
    assert row.master_name in message["text"] and "%.2f mJy" % (row.askap_iflux * 1e3) in message["text"]
    assert message["attachments"][0]["image_url"].startswith("http://racs.example.org/run/%d/source/" % first.id)
    site["options"].slack_webhook_url = ""
    try:
        assert bob.post("/run/%d/source/%s/slack/" % (first.id, row.master_name)).status_code == 404
    finally:
        site["options"].slack_webhook_url = "http://127.0.0.1:1/never"


def test_admin_shows_the_pipeline_tables_read_only(site):
    ada = client(site, "ada")
    assert ada.get("/admin/review/crossmatch/").status_code == 200
    assert ada.get("/admin/review/crossmatch/add/").status_code == 403
    assert client(site, "bob").get("/admin/").status_code == 302           # not staff: to the admin login


def test_web_command_line(site, tmp_path, capsys):
    assert racs.main(["web", "createuser", "--db", site["url"], "--username", "dee"]) == 2
    assert "createuser: no password" in capsys.readouterr().err
    assert racs.main(["web", "serve"]) == 2
    assert "give the database with --db URL" in capsys.readouterr().err
    other = "sqlite:///%s" % (tmp_path / "other.sqlite")
    assert racs.main(["web", "migrate", "--db", other]) == 2          # one database per process
    assert "configured for" in capsys.readouterr().err
    assert racs.main(["web", "--help"]) == 0
    assert "createuser" in capsys.readouterr().out
    np.testing.assert_equal(racs.main(["web", "migrate", "--db", site["url"]]), 0)


def test_racs_pipeline_works_without_django(tmp_path):
    """racs_web is imported only by the web subcommand: no Django, no problem elsewhere."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['django'] = None\n"
            "import racs_pipeline\n"
            "assert 'django' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "print('process', racs_pipeline.main(['process', '--help']))\n"
            "print('web', racs_pipeline.main(['web', 'migrate', '--db', 'sqlite:///%s']))\n"
            % (tmp_path / "x.sqlite"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(Path(racs.__file__).parent), env=dict(os.environ, MPLBACKEND="Agg"))
    assert "process 0" in done.stdout and "web 1" in done.stdout, done.stderr
    assert "the review website needs Django" in done.stderr
