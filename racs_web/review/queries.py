"""Querysets of the review site: filters, candidates, tags, cone searches.

Everything goes through the ORM with bound parameters; the one piece of raw SQL (the
Q3C cone on PostgreSQL) has its values bound too.  Cone searches: ``q3c_radial_query``
when the database has the q3c extension; elsewhere a declination band (and RA window)
in SQL refined with exact great-circle distances, so both give the same rows.
"""
import math

import numpy as np
import racs_pipeline
from django.conf import settings
from django.db import connection
from django.db.models import Count, Exists, OuterRef, Q, Subquery

from .forms import SORTS
from .models import Crossmatch, Tag

__all__ = ["candidate_q", "with_tags", "filter_crossmatches", "cone_ids", "has_q3c", "run_counts"]

_Q3C = {}


def has_q3c():
    """True when the database is PostgreSQL with the q3c extension (checked once)."""
    if connection.vendor != "postgresql":
        return False
    key = connection.settings_dict["NAME"]
    if key not in _Q3C:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_extension WHERE extname = %s", ["q3c"])
            _Q3C[key] = cursor.fetchone()[0] > 0
    return _Q3C[key]


def candidate_q():
    """The site's candidate rule: pipeline tag Good, Vs >= threshold, |m| >= threshold."""
    options = settings.RACS_WEB
    return Q(pipelinetag="Good", vs__gte=options.candidate_vs_threshold, m_abs__gte=options.candidate_m_threshold)


def _tag_of():
    return Tag.objects.filter(image_id=OuterRef("image_id"), master_name=OuterRef("master_name"))


def with_tags(queryset):
    """Crossmatches annotated with their tag (``tag``, ``tag_reason``, ``tag_user``)."""
    tags = _tag_of()
    return queryset.annotate(tag=Subquery(tags.values("usertag")[:1]),
                             tag_reason=Subquery(tags.values("userreason")[:1]),
                             tag_user=Subquery(tags.values("user__username")[:1]))


def _ranges(data):
    """(field, lookup, value) of the numeric range filters; fluxes converted mJy -> Jy."""
    out = []
    for key, column, scale in (("ratio", "ratio", 1), ("askap_flux", "askap_iflux", 1e-3),
                               ("catalog_flux", "catalog_iflux", 1e-3), ("dist", "distance_from_centre", 1),
                               ("ra", "ra", 1), ("dec", "dec", 1), ("l", "gal_l", 1), ("b", "gal_b", 1)):
        for end, lookup in (("min", "gte"), ("max", "lte")):
            value = data.get("%s_%s" % (key, end))
            if value is not None:
                out.append((column, lookup, value * scale))
    for key, column in (("vs_min", "vs"), ("m_abs_min", "m_abs"), ("nn_min", "d2d_nn_askap_cat")):
        if data.get(key) is not None:
            out.append((column, "gte", data[key]))
    return out


def filter_crossmatches(data, queryset=None):
    """The filtered and sorted crossmatches for a valid filter form's data.

    The tag subqueries are added only when a tag filter needs them; pages get their tags
    afterwards in one query (``views._attach_tags``).
    """
    qs = queryset if queryset is not None else Crossmatch.objects.all()
    if data.get("usertag") not in (None, "", "untagged", "tagged") or data.get("userreason") or data.get("checkedby"):
        qs = with_tags(qs)
    if data.get("image"):
        qs = qs.filter(image_id=data["image"])
    if data.get("name"):
        qs = qs.filter(master_name__icontains=data["name"])
    show = data.get("show") or "all"
    if show == "candidates":
        qs = qs.filter(candidate_q())
    elif show == "pipeline":
        qs = qs.filter(candidate=True)
    elif show == "flagged":
        qs = qs.filter(flagged=True)
    for key in ("transient_type", "survey", "pipelinetag"):
        if data.get(key):
            qs = qs.filter(**{key: data[key]})
    for key, column in (("flagged", "flagged"), ("convolved_error", "inflated_convolved_flux")):
        if data.get(key):
            qs = qs.filter(**{column: data[key] == "yes"})
    tag = data.get("usertag")
    if tag == "untagged":
        qs = qs.filter(~Exists(_tag_of()))
    elif tag == "tagged":
        qs = qs.filter(Exists(_tag_of()))
    elif tag:
        qs = qs.filter(tag=tag)
    if data.get("userreason"):
        qs = qs.filter(tag_reason=data["userreason"])
    if data.get("checkedby"):
        qs = qs.filter(tag_user=data["checkedby"])
    for column, lookup, value in _ranges(data):
        qs = qs.filter(**{"%s__%s" % (column, lookup): value})
    if data.get("cone"):
        qs = cone_filter(qs, *data["cone"])
    return qs.order_by(*SORTS.get(data.get("sort") or "-ratio", SORTS["-ratio"]))


def cone_filter(queryset, ra, dec, radius):
    """Rows within ``radius`` deg of (ra, dec): Q3C, or a band refined with exact distances."""
    if has_q3c():
        table = connection.ops.quote_name(Crossmatch._meta.db_table)
        return queryset.extra(where=["q3c_radial_query(%s.ra, %s.\"dec\", %%s, %%s, %%s)" % (table, table)],
                              params=[ra, dec, radius])
    return queryset.filter(id__in=cone_ids(queryset, ra, dec, radius))


def cone_ids(queryset, ra, dec, radius):
    """Ids of ``queryset`` rows within ``radius`` deg of (ra, dec) (declination band + exact distance)."""
    band = queryset.filter(dec__gte=dec - radius, dec__lte=dec + radius)
    if abs(dec) + radius < 89.0:
        width = radius / math.cos(math.radians(abs(dec) + radius))
        if width < 180.0:
            low, high = (ra - width) % 360.0, (ra + width) % 360.0
            band = band.filter(Q(ra__gte=low, ra__lte=high) if low <= high else Q(ra__gte=low) | Q(ra__lte=high))
    rows = list(band.values_list("id", "ra", "dec"))
    if not rows:
        return []
    ids, ras, decs = (np.array(v) for v in zip(*rows))
    keep = racs_pipeline._separation_deg(ras, decs, ra, dec) <= radius * (1 + 1e-9)   # the pipeline's own
    return ids[keep].tolist()


def run_counts(image_id=None):
    """``{image_id: (n_rows, n_candidates, n_checked)}`` in one grouped query (one run, or all)."""
    checked = Exists(_tag_of())
    qs = Crossmatch.objects.all() if image_id is None else Crossmatch.objects.filter(image_id=image_id)
    rows = (qs.values("image_id")
            .annotate(n=Count("id"), candidates=Count("id", filter=candidate_q()),
                      checked=Count("id", filter=candidate_q() & Q(checked))))
    return {r["image_id"]: (r["n"], r["candidates"], r["checked"]) for r in rows}

