"""Views of the review site.

Reading needs a login unless ``[WEB] public_read`` is set; every change (claims, tags,
comments, Slack, the hotkey switch) is a POST with a CSRF token from a logged-in user.
No file path is ever taken from a request: plots and stamps are found from the run's
row in the database and must lie inside its output directory.
"""
import csv
import json
import logging
import urllib.parse
import urllib.request
from functools import wraps
from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import IntegrityError, transaction
from django.db.models import Count, Exists, OuterRef
from django.http import FileResponse, Http404, HttpResponseRedirect, StreamingHttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from .forms import CommentForm, CrossmatchFilterForm, TagForm, TagSearchForm
from .models import HOTKEYS, STAFF_TAGS, TAG_REASONS, Claim, Comment, Crossmatch, Image, Profile, Tag, TagEvent
from .queries import candidate_q, cone_filter, filter_crossmatches, run_counts

log = logging.getLogger("racs_web")

TYPE_LABELS = {"match": "Match", "noaskapmatch": "No ASKAP match", "nocatalogmatch": "No catalogue match"}
RUN_SORTS = {"id": "id", "-id": "-id", "name": "name", "runtime": "runtime", "-runtime": "-runtime",
             "dec": "dec", "candidates": "-number_candidates"}
LIST_COLUMNS = [("master_name", "name"), ("transient_type", "type"), ("survey", "survey"),
                ("ra", "RA (deg)"), ("dec", "Dec (deg)"), ("d2d", "d2d (\")"), ("askap_iflux", "ASKAP (mJy)"),
                ("catalog_iflux", "catalogue (mJy)"), ("ratio", "ratio"), ("vs", "Vs"), ("m", "m"),
                ("pipelinetag", "pipeline tag")]
CSV_COLUMNS = ["image_id", "master_name", "askap_name", "catalog_name", "ra", "dec", "gal_l", "gal_b", "survey",
               "transient_type", "d2d", "askap_iflux", "askap_iflux_err", "askap_scaled_flux", "catalog_iflux",
               "catalog_iflux_err", "ratio", "ratio_e", "vs", "m", "m_abs", "pipelinetag", "transient_class",
               "forced_flux", "forced_flux_err", "forced_sigma", "distance_from_centre", "d2d_nn_askap_cat"]


def options():
    return settings.RACS_WEB


def site_context(request):
    """Template context of every page."""
    return {"web": options(), "hotkeys_on": request.session.get("hotkeys", True) if hasattr(request, "session") else True,
            "slack_enabled": bool(options().slack_webhook_url)}


def read_view(view):
    """Reading is public only when ``public_read`` is set; otherwise a login is needed."""
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        if not options().public_read and not request.user.is_authenticated:
            from django.contrib.auth.views import redirect_to_login
            return redirect_to_login(request.get_full_path())
        return view(request, *args, **kwargs)
    return wrapped


def _safe_next(request, target, fallback):
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()},
                                                  require_https=request.is_secure()):
        return target
    return fallback


def _csv_response(filename, header, rows):
    class Echo:
        def write(self, value):
            return value
    writer = csv.writer(Echo())

    def stream():
        yield writer.writerow(header)
        for row in rows:
            yield writer.writerow(row)
    response = StreamingHttpResponse(stream(), content_type="text/csv")
    response["Content-Disposition"] = 'attachment; filename="%s"' % filename
    return response


# ---------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------
@require_GET
@read_view
def home(request):
    """Every run: image, tag, centre, surveys, counts, runtime, claimed by (CSV export)."""
    sort = RUN_SORTS.get(request.GET.get("sort", "-id"), "-id")
    images = Image.objects.order_by(sort, "id").defer("settings")
    counts = run_counts()
    claims = dict(Claim.objects.values_list("image_id", "user__username"))
    rows = [{"image": image, "rows": counts.get(image.id, (0, 0, 0))[0],
             "candidates": counts.get(image.id, (0, 0, 0))[1], "checked": counts.get(image.id, (0, 0, 0))[2],
             "claimed_by": claims.get(image.id, "")} for image in images]
    if request.GET.get("format") == "csv":
        header = ["id", "name", "tag", "ra", "dec", "matched_to", "askap_sources", "sumss_sources", "nvss_sources",
                  "crossmatches", "candidates", "checked", "runtime", "claimed_by"]
        return _csv_response("racs_runs.csv", header, (
            [r["image"].id, r["image"].name, r["image"].description, r["image"].ra, r["image"].dec,
             r["image"].matched_to, r["image"].number_askap_sources, r["image"].number_sumss_sources,
             r["image"].number_nvss_sources, r["rows"], r["candidates"], r["checked"], r["image"].runtime,
             r["claimed_by"]] for r in rows))
    page = Paginator(rows, 100).get_page(request.GET.get("page"))
    return render(request, "review/home.html", {"page": page, "sort": request.GET.get("sort", "-id")})


def _summary(image):
    """The run's summary JSON (from its output directory), or {}."""
    import racs_pipeline
    if not image.output_dir:
        return {}
    stem = racs_pipeline._image_stem(image.name or "")
    path = Path(image.output_dir) / ("%s_summary.json" % stem)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _inside(base, relative):
    """``base/relative`` when it exists and stays inside ``base``; else None."""
    if not base or not relative or relative == "N/A":
        return None
    base = Path(base).resolve()
    path = (base / relative).resolve()
    if base not in path.parents or not path.is_file():
        return None
    return path


@require_GET
@read_view
def run_detail(request, image_id):
    image = get_object_or_404(Image, pk=image_id)
    try:
        run_settings = json.loads(image.settings or "{}")
    except ValueError:
        run_settings = {}
    summary = _summary(image)
    rows = Crossmatch.objects.filter(image_id=image.id)
    by_type = dict(rows.values_list("transient_type").annotate(n=Count("id")))
    by_tag = sorted(rows.values_list("pipelinetag").annotate(n=Count("id")), key=lambda t: -t[1])
    counts = run_counts(image.id).get(image.id, (0, 0, 0))
    claim = Claim.objects.select_related("user").filter(image_id=image.id).first()
    comments = Comment.objects.filter(image_id=image.id, master_name="").select_related("user")
    return render(request, "review/run_detail.html", {
        "image": image, "settings": run_settings,
        "plots": [(k, name) for k, name in enumerate(summary.get("plots", [])) if str(name).endswith(".png")],
        "summary": summary, "by_type": [(TYPE_LABELS.get(k, k), v) for k, v in by_type.items()],
        "by_tag": by_tag, "counts": counts, "claim": claim, "comments": comments, "comment_form": CommentForm()})


@require_GET
@read_view
def run_plot(request, image_id, index):
    image = get_object_or_404(Image, pk=image_id)
    plots = _summary(image).get("plots", [])
    if not 0 <= index < len(plots):
        raise Http404("no such plot")
    path = _inside(image.output_dir, plots[index])
    if path is None or path.suffix.lower() != ".png":
        raise Http404("plot not found")
    return FileResponse(path.open("rb"), content_type="image/png")


@login_required
@require_POST
def claim(request, image_id):
    image = get_object_or_404(Image, pk=image_id)
    try:
        with transaction.atomic():
            Claim.objects.create(image_id=image.id, user=request.user)
        messages.success(request, "You have claimed run %d." % image.id)
    except IntegrityError:
        owner = Claim.objects.get(image_id=image.id).user.username
        messages.error(request, "Run %d is claimed by %s already." % (image.id, owner))
    return HttpResponseRedirect(reverse("run", args=[image.id]))


@login_required
@require_POST
def unclaim(request, image_id):
    image = get_object_or_404(Image, pk=image_id)
    current = Claim.objects.filter(image_id=image.id).select_related("user").first()
    if current is None:
        messages.info(request, "Run %d is not claimed." % image.id)
    elif current.user != request.user and not request.user.is_staff:
        raise PermissionDenied("only %s or staff can release the claim of run %d" % (current.user.username, image.id))
    else:
        current.delete()
        messages.success(request, "Claim of run %d released." % image.id)
    return HttpResponseRedirect(reverse("run", args=[image.id]))


# ---------------------------------------------------------------------------
# crossmatch tables and the global query
# ---------------------------------------------------------------------------
def _attach_tags(rows):
    """Set ``tag``, ``tag_reason``, ``tag_user`` on crossmatch rows (one query for a page)."""
    keys = {(r.image_id, r.master_name) for r in rows}
    found = {}
    if keys:
        names = {name for _, name in keys}
        for t in Tag.objects.filter(image_id__in={i for i, _ in keys}, master_name__in=names).select_related("user"):
            found[(t.image_id, t.master_name)] = t
    for r in rows:
        t = found.get((r.image_id, r.master_name))
        r.tag, r.tag_reason, r.tag_user = (t.usertag, t.userreason, t.user.username) if t else ("", "", "")
        r.type_label = TYPE_LABELS.get(r.transient_type, r.transient_type)
    return rows


def _query_string(data, drop=("page",)):
    return urllib.parse.urlencode([(k, v) for k, v in data.items() if k not in drop and v not in ("", None)])


def _crossmatch_list(request, image=None):
    data = request.GET.copy()
    if image is not None:
        data["image"] = str(image.id)
    form = CrossmatchFilterForm(data)
    context = {"form": form, "image": image, "columns": LIST_COLUMNS}
    if not form.is_valid():
        return render(request, "review/crossmatch_list.html", dict(context, page=None), status=400)
    qs = filter_crossmatches(form.cleaned_data)
    if request.GET.get("format") == "csv":
        rows = qs.values_list(*CSV_COLUMNS)
        return _csv_response("racs_crossmatches.csv", CSV_COLUMNS, rows.iterator(chunk_size=2000))
    paginator = Paginator(qs, options().page_size)
    page = paginator.get_page(request.GET.get("page"))
    rows = _attach_tags(list(page.object_list))
    offset = (page.number - 1) * paginator.per_page
    query = _query_string({k: v for k, v in data.items()})
    for k, row in enumerate(rows):
        row.position = offset + k
    gallery = request.GET.get("view") == "gallery"
    if request.user.is_authenticated and image is None:
        Profile.objects.update_or_create(user=request.user, defaults={"last_query": query})
    return render(request, "review/crossmatch_list.html", dict(
        context, page=page, rows=rows, query=query, gallery=gallery, total=paginator.count))


@require_GET
@read_view
def run_crossmatches(request, image_id):
    return _crossmatch_list(request, get_object_or_404(Image, pk=image_id))


@require_GET
@read_view
def query(request):
    if not request.GET and request.user.is_authenticated:
        profile = Profile.objects.filter(user=request.user).first()
        if profile and profile.last_query:
            return HttpResponseRedirect(reverse("query") + "?" + profile.last_query)
    return _crossmatch_list(request)


def _neighbours(query_string, position):
    """(previous, next) crossmatches around ``position`` of the query ``query_string``."""
    data = urllib.parse.parse_qs(query_string or "")
    form = CrossmatchFilterForm({k: v[-1] for k, v in data.items()})
    if position is None or not form.is_valid():
        return None, None
    qs = filter_crossmatches(form.cleaned_data)
    start = max(0, position - 1)
    window = list(qs[start:position + 2])
    here = position - start
    before = window[here - 1] if here >= 1 and len(window) > here - 1 else None
    after = window[here + 1] if len(window) > here + 1 else None
    return before, after


# ---------------------------------------------------------------------------
# one source
# ---------------------------------------------------------------------------
def _source(image_id, name):
    return get_object_or_404(Crossmatch.objects.select_related("image"), image_id=image_id, master_name=name)


def _can_tag(user, image_id):
    """(allowed, reason): logged in, and the run is unclaimed, claimed by the user, or the user is staff."""
    if not user.is_authenticated:
        return False, "log in to tag"
    current = Claim.objects.filter(image_id=image_id).select_related("user").first()
    if current is None or current.user == user or user.is_staff:
        return True, ""
    return False, "run %d is claimed by %s" % (image_id, current.user.username)


@require_GET
@read_view
def source_detail(request, image_id, name):
    xm = _source(image_id, name)
    _attach_tags([xm])
    query_string = request.GET.get("q", "")
    try:
        position = int(request.GET["i"]) if "i" in request.GET else None
    except ValueError:
        position = None
    before, after = _neighbours(query_string, position)
    nearest_names = [n for n in (xm.nearest_sources or "").split(",") if n]
    nearest = Crossmatch.objects.filter(image_id=image_id, master_name__in=nearest_names).only(
        "master_name", "ra", "dec", "ratio", "pipelinetag", "image_id")
    others = cone_filter(Crossmatch.objects.exclude(image_id=image_id), xm.ra, xm.dec,
                         5.0 / 3600.0).select_related("image").order_by("image_id", "id")
    allowed, reason = _can_tag(request.user, image_id)
    tag = Tag.objects.filter(image_id=image_id, master_name=name).select_related("user").first()
    events = TagEvent.objects.filter(image_id=image_id, master_name=name).select_related("user")
    comments = Comment.objects.filter(image_id=image_id, master_name=name).select_related("user")
    coords = "%.6f %+.6f" % (xm.ra, xm.dec)
    tags = [(t, [(r, k) for r, k in reasons.items()], t in STAFF_TAGS) for t, reasons in TAG_REASONS.items()]
    return render(request, "review/source_detail.html", {
        "xm": xm, "image": xm.image, "type_label": TYPE_LABELS.get(xm.transient_type, xm.transient_type),
        "before": before, "after": after, "position": position, "query": query_string,
        "nearest": nearest, "others": others, "can_tag": allowed, "tag_blocked": reason, "tag": tag,
        "events": events, "comments": comments, "comment_form": CommentForm(), "tags": tags,
        "hotkeys": json.dumps(HOTKEYS), "coords": coords, "has_stamp": _inside(xm.image.output_dir, xm.ploturl) is not None,
        "simbad": "https://simbad.cds.unistra.fr/simbad/sim-coo?" + urllib.parse.urlencode(
            {"Coord": coords, "Radius": 10, "Radius.unit": "arcmin"}),
        "ned": "https://ned.ipac.caltech.edu/conesearch?" + urllib.parse.urlencode(
            {"search_type": "Near Position Search", "coordinates": coords, "radius": 2}),
        "is_candidate": Crossmatch.objects.filter(pk=xm.pk).filter(candidate_q()).exists()})


@require_GET
@read_view
def source_stamp(request, image_id, name):
    xm = _source(image_id, name)
    path = _inside(xm.image.output_dir, xm.ploturl)
    if path is None or path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
        raise Http404("no postage stamp for this source")
    return FileResponse(path.open("rb"), content_type="image/png" if path.suffix.lower() == ".png" else "image/jpeg")


def _source_url(image_id, name, query_string="", position=None):
    url = reverse("source", args=[image_id, name])
    if query_string and position is not None:
        url += "?" + urllib.parse.urlencode({"q": query_string, "i": position})
    return url


@login_required
@require_POST
def tag(request, image_id, name):
    """Set, change or clear one's tag; staff-only tags, claims and other users' tags enforced."""
    xm = _source(image_id, name)
    form = TagForm(request.POST)
    back = _safe_next(request, request.POST.get("back"), _source_url(image_id, name))
    if not form.is_valid():
        messages.error(request, "Tag not saved: %s" % " ".join(str(e) for errs in form.errors.values() for e in errs))
        return HttpResponseRedirect(back)
    usertag, reason = form.cleaned_data["usertag"], form.cleaned_data["userreason"]
    if usertag in STAFF_TAGS and not request.user.is_staff:
        raise PermissionDenied("only staff can tag a source %r" % usertag)
    allowed, why = _can_tag(request.user, image_id)
    if not allowed:
        raise PermissionDenied("you cannot tag in this run: %s" % why)
    try:
        with transaction.atomic():
            current = Tag.objects.select_for_update().filter(image_id=image_id, master_name=name).first()
            if current is not None and current.user != request.user:
                messages.error(request, "Not changed: %s tagged %s as %s (%s) first; only they can change it."
                               % (current.user.username, name, current.usertag, current.userreason))
                return HttpResponseRedirect(back)
            old = "%s: %s" % (current.usertag, current.userreason) if current else ""
            if not usertag:
                if current is not None:
                    current.delete()
                    TagEvent.objects.create(image_id=image_id, master_name=name, user=request.user, action="clear",
                                            old=old)
                return HttpResponseRedirect(back)
            if current is None:
                Tag.objects.create(image_id=image_id, master_name=name, usertag=usertag, userreason=reason,
                                   user=request.user)
            else:
                current.usertag, current.userreason = usertag, reason
                current.save()
            TagEvent.objects.create(image_id=image_id, master_name=name, user=request.user,
                                    action="change" if current else "set", old=old, new="%s: %s" % (usertag, reason))
    except IntegrityError:          # someone tagged it in the same instant
        messages.error(request, "Not changed: another user tagged %s at the same moment." % name)
        return HttpResponseRedirect(back)
    messages.success(request, "%s tagged %s (%s)." % (xm.master_name, usertag, reason))
    return HttpResponseRedirect(_safe_next(request, form.cleaned_data.get("next"), back))


@login_required
@require_POST
def comment(request, image_id):
    image = get_object_or_404(Image, pk=image_id)
    form = CommentForm(request.POST)
    name = request.POST.get("master_name", "")
    back = _source_url(image.id, name) if name else reverse("run", args=[image.id])
    if name and not Crossmatch.objects.filter(image_id=image.id, master_name=name).exists():
        raise Http404("no such source in this run")
    if not form.is_valid():
        messages.error(request, "Comment not saved: give a title and a text.")
        return HttpResponseRedirect(back)
    parent = None
    if form.cleaned_data.get("parent"):
        parent = get_object_or_404(Comment, pk=form.cleaned_data["parent"], image_id=image.id, master_name=name)
    Comment.objects.create(image_id=image.id, master_name=name, parent=parent, user=request.user,
                           title=form.cleaned_data["title"], text=form.cleaned_data["text"])
    return HttpResponseRedirect(back)


def slack_payload(xm, request):
    """The Slack message of a candidate: position, type, ratio, fluxes (mJy), Vs, m, tags, stamp link."""
    base = options().base_url.rstrip("/") or request.build_absolute_uri("/").rstrip("/")
    page = base + reverse("source", args=[xm.image_id, xm.master_name])
    text = ("*%s* (run %d, %s)\nRA, Dec %.5f, %+.5f; l, b %.3f, %+.3f\n%s, ratio %.2f +- %.2f, "
            "ASKAP %.2f mJy, %s %.2f mJy, Vs %.1f, m %.2f\npipeline tag %s; user tag %s\n%s") % (
        xm.master_name, xm.image_id, xm.image.name, xm.ra, xm.dec, xm.gal_l or 0, xm.gal_b or 0,
        TYPE_LABELS.get(xm.transient_type, xm.transient_type), xm.ratio or 0, xm.ratio_e or 0,
        (xm.askap_iflux or 0) * 1e3, (xm.survey or "").upper(), (xm.catalog_iflux or 0) * 1e3, xm.vs or 0,
        xm.m or 0, xm.pipelinetag, ("%s (%s)" % (xm.tag, xm.tag_reason)) if xm.tag else "none", page)
    payload = {"text": text}
    if _inside(xm.image.output_dir, xm.ploturl) is not None:
        payload["attachments"] = [{"title": xm.master_name, "image_url": base + reverse(
            "stamp", args=[xm.image_id, xm.master_name])}]
    return payload


@login_required
@require_POST
def slack(request, image_id, name):
    """Send the candidate to the configured Slack webhook (off unless ``slack_webhook_url``)."""
    url = options().slack_webhook_url
    if not url:
        raise Http404("Slack is not configured ([WEB] slack_webhook_url)")
    xm = _source(image_id, name)
    _attach_tags([xm])
    body = json.dumps(slack_payload(xm, request)).encode()
    request_out = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request_out, timeout=10) as answer:
            ok = 200 <= answer.status < 300
    except OSError as exc:
        ok = False
        log.warning("Slack webhook failed: %s", exc)
    if ok:
        messages.success(request, "Sent %s to Slack." % name)
    else:
        messages.error(request, "Slack did not accept the message; see the server log.")
    return HttpResponseRedirect(_source_url(image_id, name))


# ---------------------------------------------------------------------------
# tag search, hotkeys
# ---------------------------------------------------------------------------
@require_GET
@read_view
def tag_search(request):
    form = TagSearchForm(request.GET)
    tags = Tag.objects.select_related("user").order_by("-updated", "id")
    if form.is_valid():
        data = form.cleaned_data
        if data.get("usertag"):
            tags = tags.filter(usertag=data["usertag"])
        if data.get("user"):
            tags = tags.filter(user__username=data["user"])
        if data.get("transient_type"):
            tags = tags.filter(Exists(Crossmatch.objects.filter(
                image_id=OuterRef("image_id"), master_name=OuterRef("master_name"),
                transient_type=data["transient_type"])))
    else:
        return render(request, "review/tag_search.html", {"form": form, "page": None}, status=400)
    if request.GET.get("format") == "csv":
        return _csv_response("racs_vetted.csv", ["image_id", "master_name", "usertag", "userreason", "user", "updated"],
                             ([t.image_id, t.master_name, t.usertag, t.userreason, t.user.username,
                               t.updated.isoformat()] for t in tags.iterator()))
    page = Paginator(tags, options().page_size).get_page(request.GET.get("page"))
    return render(request, "review/tag_search.html", {"form": form, "page": page,
                                                      "query": _query_string(request.GET.dict())})


@require_POST
def hotkeys(request):
    """Switch the hotkeys of this session on or off."""
    request.session["hotkeys"] = not request.session.get("hotkeys", True)
    return HttpResponseRedirect(_safe_next(request, request.POST.get("back"), reverse("home")))


def error_page(status, title):
    def view(request, exception=None):
        return render(request, "review/error.html", {"status": status, "title": title,
                                                     "message": str(exception or "")}, status=status)
    return view


def csrf_failure(request, reason=""):
    return render(request, "review/error.html", {"status": 403, "title": "Forbidden (CSRF check failed)",
                                                 "message": reason}, status=403)


__all__ = ["home", "run_detail", "run_plot", "claim", "unclaim", "run_crossmatches", "query", "source_detail",
           "source_stamp", "tag", "comment", "slack", "tag_search", "hotkeys", "site_context", "slack_payload"]
