"""Forms: the crossmatch filter (every filter of the original), tags, comments.

Bad input (text in a number field, a malformed coordinate, an unknown choice) is a form
error shown to the user, never a server error; every value reaches the database as a
bound parameter through the ORM.
"""
import math

from django import forms

from .models import TAG_REASONS, TAGS

__all__ = ["CrossmatchFilterForm", "TagForm", "CommentForm", "TagSearchForm", "parse_angle",
           "SORTS", "PIPELINE_TAGS"]

TRANSIENT_TYPES = [("", "any"), ("match", "match"), ("noaskapmatch", "no ASKAP match"),
                   ("nocatalogmatch", "no catalogue match")]
SURVEYS = [("", "any"), ("sumss", "SUMSS"), ("nvss", "NVSS")]
PIPELINE_TAGS = ["Good", "Failed", "Likely artefact (bright source)", "No ASKAP data at position",
                 "Forced fit failed", "Forced flux consistent", "Likely bright extended structure",
                 "Local RMS too high", "Likely double", "Created convolved source",
                 "Inflated convolved flux error", "Extended source", "Large island source", "Edge of ASKAP image"]
SHOW = [("all", "all rows"), ("candidates", "candidates (Good, Vs and |m| thresholds)"),
        ("pipeline", "pipeline candidates"), ("flagged", "flagged by the pipeline")]
YES_NO = [("", "any"), ("yes", "yes"), ("no", "no")]
UNITS = {"arcsec": 1 / 3600.0, "arcmin": 1 / 60.0, "deg": 1.0}
# sort key -> ORM ordering (the id breaks ties, so pages never overlap)
SORTS = {"-ratio": ("-ratio", "id"), "ratio": ("ratio", "id"), "-vs": ("-vs", "id"),
         "-m_abs": ("-m_abs", "id"), "-askap_flux": ("-askap_iflux", "id"), "askap_flux": ("askap_iflux", "id"),
         "-catalog_flux": ("-catalog_iflux", "id"), "catalog_flux": ("catalog_iflux", "id"),
         "distance": ("distance_from_centre", "id"), "id": ("id",)}


def parse_angle(text, hours=False):
    """Degrees from '123.45', '12:34:56.7', '12h34m56.7s', '-30 12 34' (sexagesimal RA in hours).

    Raises
    ------
    forms.ValidationError
        When the text is not an angle.
    """
    import astropy.units as u
    from astropy.coordinates import Angle
    text = str(text).strip()
    try:
        value = float(text)
    except ValueError:
        try:
            value = Angle(text, unit=u.hourangle if hours else u.deg).to_value(u.deg)
        except (ValueError, u.UnitsError, TypeError):
            raise forms.ValidationError("%r is not a %s (use degrees or %s)" % (
                text, "right ascension" if hours else "declination",
                "hh:mm:ss.s" if hours else "dd:mm:ss")) from None
    if not math.isfinite(value):
        raise forms.ValidationError("%r is not a finite angle" % text)
    return value


class _Range(forms.FloatField):
    """An optional finite number."""

    def __init__(self, label, **kwargs):
        super().__init__(label=label, required=False, **kwargs)

    def clean(self, value):
        value = super().clean(value)
        if value is not None and not math.isfinite(value):
            raise forms.ValidationError("give a finite number")
        return value


class CrossmatchFilterForm(forms.Form):
    """Filters of the crossmatch table and the global query page (all optional)."""

    image = forms.IntegerField(label="run id", required=False, min_value=1)
    name = forms.CharField(label="source name contains", required=False, max_length=64)
    show = forms.ChoiceField(label="show", choices=SHOW, required=False)
    transient_type = forms.ChoiceField(label="type", choices=TRANSIENT_TYPES, required=False)
    survey = forms.ChoiceField(label="survey", choices=SURVEYS, required=False)
    pipelinetag = forms.ChoiceField(label="pipeline tag", required=False,
                                    choices=[("", "any")] + [(t, t) for t in PIPELINE_TAGS])
    flagged = forms.ChoiceField(label="flagged", choices=YES_NO, required=False)
    convolved_error = forms.ChoiceField(label="convolved flux error", choices=YES_NO, required=False)
    usertag = forms.ChoiceField(label="user tag", required=False,
                                choices=[("", "any"), ("untagged", "not tagged"), ("tagged", "tagged")]
                                + [(t, t) for t in TAGS])
    userreason = forms.ChoiceField(label="user reason", required=False,
                                   choices=[("", "any")] + [(r, r) for reasons in TAG_REASONS.values() for r in reasons])
    checkedby = forms.CharField(label="checked by (user)", required=False, max_length=150)
    ratio_min, ratio_max = _Range("ratio >="), _Range("ratio <=")
    vs_min = _Range("Vs >=")
    m_abs_min = _Range("|m| >=")
    askap_flux_min, askap_flux_max = _Range("ASKAP flux >= (mJy)"), _Range("ASKAP flux <= (mJy)")
    catalog_flux_min, catalog_flux_max = _Range("catalogue flux >= (mJy)"), _Range("catalogue flux <= (mJy)")
    dist_min, dist_max = _Range("distance from centre >= (deg)"), _Range("distance from centre <= (deg)")
    ra_min, ra_max = _Range("RA >= (deg)"), _Range("RA <= (deg)")
    dec_min, dec_max = _Range("Dec >= (deg)"), _Range("Dec <= (deg)")
    l_min, l_max = _Range("l >= (deg)"), _Range("l <= (deg)")
    b_min, b_max = _Range("b >= (deg)"), _Range("b <= (deg)")
    nn_min = _Range("nearest ASKAP neighbour >= (arcsec)")
    cone_ra = forms.CharField(label="cone RA (deg or hh:mm:ss)", required=False, max_length=40)
    cone_dec = forms.CharField(label="cone Dec (deg or dd:mm:ss)", required=False, max_length=40)
    cone_radius = _Range("cone radius", min_value=0.0)
    cone_unit = forms.ChoiceField(label="unit", choices=[(u, u) for u in UNITS], required=False)
    sort = forms.ChoiceField(label="sort", required=False, choices=[(k, k) for k in SORTS])

    def clean(self):
        data = super().clean()
        cone = [data.get("cone_ra"), data.get("cone_dec"), data.get("cone_radius")]
        if any(v not in (None, "") for v in cone):
            if any(v in (None, "") for v in cone):
                raise forms.ValidationError("a cone search needs RA, Dec and a radius")
            ra = parse_angle(data["cone_ra"], hours=not _looks_like_degrees(data["cone_ra"]))
            dec = parse_angle(data["cone_dec"])
            if not -90.0 <= dec <= 90.0:
                self.add_error("cone_dec", "declination %.4f is outside -90..90" % dec)
            data["cone"] = (ra % 360.0, dec, data["cone_radius"] * UNITS[data.get("cone_unit") or "arcsec"])
        return data


def _looks_like_degrees(text):
    try:
        float(str(text).strip())
        return True
    except ValueError:
        return "d" in str(text) or "°" in str(text)


class TagForm(forms.Form):
    """A tag from the original's set (usertag + reason); '' clears one's own tag."""

    usertag = forms.ChoiceField(choices=[("", "clear")] + [(t, t) for t in TAGS], required=False)
    userreason = forms.CharField(max_length=32, required=False)
    next = forms.CharField(max_length=2000, required=False)

    def clean(self):
        data = super().clean()
        tag, reason = data.get("usertag"), data.get("userreason")
        if tag and reason not in TAG_REASONS.get(tag, {}):
            raise forms.ValidationError("%r is not a reason of the tag %r (one of %s)"
                                        % (reason, tag, ", ".join(TAG_REASONS.get(tag, {}))))
        return data


class CommentForm(forms.Form):
    title = forms.CharField(max_length=200)
    text = forms.CharField(max_length=5000, widget=forms.Textarea(attrs={"rows": 3}))
    master_name = forms.CharField(max_length=64, required=False)
    parent = forms.IntegerField(required=False, min_value=1)


class TagSearchForm(forms.Form):
    transient_type = forms.ChoiceField(label="type", choices=TRANSIENT_TYPES, required=False)
    usertag = forms.ChoiceField(label="tag", choices=[("", "any")] + [(t, t) for t in TAGS], required=False)
    user = forms.CharField(label="user", required=False, max_length=150)
