"""Models of the review website.

The pipeline's tables (``racs_images``, ``racs_sources``, ``racs_crossmatches``,
``racs_transients``) belong to ``racs_pipeline.RacsDatabase``: the models below map
them read-only (``managed = False``; ``tests/test_racs_web.py`` fails when a column of
``RacsDatabase`` is missing here or differs in type).  The site's own tables (claims,
tags and their history, comments, saved queries) are Django-managed with migrations.

A run keeps its id when the pipeline re-injects it (``RacsDatabase.inject``), and a
source is addressed by (run id, ``master_name``), which is stable across re-runs of the
same data; the site's tables use those keys, not crossmatch row ids.
"""
from django.conf import settings
from django.db import models

__all__ = ["Image", "Source", "Crossmatch", "Transient", "Claim", "Tag", "TagEvent", "Comment",
           "Profile", "TAGS", "TAG_REASONS", "STAFF_TAGS", "HOTKEYS"]


# ---------------------------------------------------------------------------
# pipeline tables (owned by racs_pipeline)
# ---------------------------------------------------------------------------
class Image(models.Model):
    """One pipeline run on one image plane (``racs_images``)."""

    unique_tag = models.TextField(null=True)
    name = models.TextField(null=True)
    description = models.TextField(null=True)
    ra = models.FloatField(null=True)
    dec = models.FloatField(null=True)
    runtime = models.TextField(null=True)
    url = models.TextField(null=True)
    url_2 = models.TextField(null=True)
    runby = models.TextField(null=True)
    number_askap_sources = models.IntegerField(null=True)
    number_sumss_sources = models.IntegerField(null=True)
    number_nvss_sources = models.IntegerField(null=True)
    rms = models.FloatField(null=True)
    frequency = models.FloatField(null=True)
    transients_master_total = models.IntegerField(null=True)
    number_candidates = models.IntegerField(null=True)
    matched_to = models.TextField(null=True)
    claimed_by = models.TextField(null=True)
    number_candidates_checked = models.IntegerField(null=True)
    output_dir = models.TextField(null=True)
    settings = models.TextField(null=True)
    checksum = models.TextField(null=True)
    plane = models.TextField(null=True)
    date_obs = models.TextField(null=True)
    analysis_image = models.TextField(null=True)
    mode = models.TextField(null=True)

    class Meta:
        managed = False
        db_table = "racs_images"
        ordering = ["id"]

    def __str__(self):
        return "%s (%s)" % (self.name, self.description)


class Source(models.Model):
    """An ASKAP component of a run (``racs_sources``)."""

    image = models.ForeignKey(Image, on_delete=models.DO_NOTHING, db_column="image_id", related_name="sources")
    name = models.TextField(null=True)
    ra = models.FloatField(null=True)
    dec = models.FloatField(null=True)
    int_flux = models.FloatField(null=True)
    err_int_flux = models.FloatField(null=True)
    peak_flux = models.FloatField(null=True)
    err_peak_flux = models.FloatField(null=True)
    local_rms = models.FloatField(null=True)
    a = models.FloatField(null=True)
    b = models.FloatField(null=True)
    pa = models.FloatField(null=True)
    island = models.IntegerField(null=True)
    flags = models.IntegerField(null=True)
    extended = models.BooleanField(null=True)

    class Meta:
        managed = False
        db_table = "racs_sources"


class Crossmatch(models.Model):
    """One row of a run's transient master table (``racs_crossmatches``); fluxes in Jy."""

    image = models.ForeignKey(Image, on_delete=models.DO_NOTHING, db_column="image_id", related_name="crossmatches")
    master_name = models.TextField(null=True)
    askap_name = models.TextField(null=True)
    catalog_name = models.TextField(null=True)
    ra = models.FloatField(null=True)
    dec = models.FloatField(null=True)
    gal_l = models.FloatField(null=True)
    gal_b = models.FloatField(null=True)
    survey = models.TextField(null=True)
    transient_type = models.TextField(null=True)
    d2d = models.FloatField(null=True)
    askap_iflux = models.FloatField(null=True)
    askap_iflux_err = models.FloatField(null=True)
    askap_scaled_flux = models.FloatField(null=True)
    askap_scaled_flux_err = models.FloatField(null=True)
    askap_local_rms = models.FloatField(null=True)
    catalog_iflux = models.FloatField(null=True)
    catalog_iflux_err = models.FloatField(null=True)
    catalog_rms = models.FloatField(null=True)
    catalog_mosaic = models.TextField(null=True)
    ratio = models.FloatField(null=True)
    ratio_e = models.FloatField(null=True)
    ratio_askap_flux = models.FloatField(null=True)
    vs = models.FloatField(null=True)
    m = models.FloatField(null=True)
    m_abs = models.FloatField(null=True)
    predicted_snr = models.FloatField(null=True)
    aegean_rms_used = models.BooleanField(null=True)
    d2d_nn_askap_cat = models.FloatField(null=True)
    distance_from_centre = models.FloatField(null=True)
    pipelinetag = models.TextField(null=True)
    transient_class = models.TextField(null=True)
    candidate = models.BooleanField(null=True)
    flagged = models.BooleanField(null=True)
    usertag = models.TextField(null=True)
    userreason = models.TextField(null=True)
    checkedby = models.TextField(null=True)
    ploturl = models.TextField(null=True)
    inflated_convolved_flux = models.BooleanField(null=True)
    nearest_sources = models.TextField(null=True)
    forced_flux = models.FloatField(null=True)
    forced_flux_err = models.FloatField(null=True)
    forced_sigma = models.FloatField(null=True)
    forced_status = models.TextField(null=True)

    class Meta:
        managed = False
        db_table = "racs_crossmatches"

    def __str__(self):
        return "%s in run %s" % (self.master_name, self.image_id)


class Transient(models.Model):
    """The pipeline's candidate list of a run (``racs_transients``)."""

    image = models.ForeignKey(Image, on_delete=models.DO_NOTHING, db_column="image_id", related_name="transients")
    crossmatch = models.ForeignKey(Crossmatch, on_delete=models.DO_NOTHING, db_column="crossmatch_id", null=True,
                                   related_name="+")
    master_name = models.TextField(null=True)
    transient_class = models.TextField(null=True)
    ra = models.FloatField(null=True)
    dec = models.FloatField(null=True)
    ratio = models.FloatField(null=True)

    class Meta:
        managed = False
        db_table = "racs_transients"


# ---------------------------------------------------------------------------
# the site's own tables
# ---------------------------------------------------------------------------
# The original's tags: usertag -> {reason: hotkey}; "transient" and "maybe" are staff-only.
TAG_REASONS = {
    "ignore": {"is match": "m", "non-detection": "n", "extended": "e", "bright source": "b", "multiple": "d"},
    "problem": {"edge of field": "f", "convolved flux error": "c", "catalogue artefact": "a",
                "ASKAP artefact": "q", "src. ext. error": "s", "too noisy": "o"},
    "transient": {"transient": "t"},
    "maybe": {"maybe": "y"},
    "investigate": {"investigate": "i"},
    "help": {"not sure": "x"},
}
TAGS = tuple(TAG_REASONS)
STAFF_TAGS = ("transient", "maybe")
HOTKEYS = {key: (tag, reason) for tag, reasons in TAG_REASONS.items() for reason, key in reasons.items()}


class Claim(models.Model):
    """Who vets a run (one claim per run)."""

    image_id = models.IntegerField(unique=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="claims")
    claimed_at = models.DateTimeField(auto_now_add=True)


class Tag(models.Model):
    """A user's verdict on one source of one run; the first tagger owns it."""

    image_id = models.IntegerField(db_index=True)
    master_name = models.CharField(max_length=64)
    usertag = models.CharField(max_length=16, choices=[(t, t) for t in TAGS])
    userreason = models.CharField(max_length=32)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="tags")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["image_id", "master_name"], name="one_tag_per_source")]


class TagEvent(models.Model):
    """Every change of a tag: who, when, from what to what."""

    image_id = models.IntegerField(db_index=True)
    master_name = models.CharField(max_length=64)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="tag_events")
    action = models.CharField(max_length=16)               # set, change, clear
    old = models.CharField(max_length=64, blank=True)
    new = models.CharField(max_length=64, blank=True)
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["at", "id"]


class Comment(models.Model):
    """A comment on a run (``master_name`` empty) or on one of its sources; replies thread."""

    image_id = models.IntegerField(db_index=True)
    master_name = models.CharField(max_length=64, blank=True, default="")
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="replies")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="comments")
    title = models.CharField(max_length=200)
    text = models.TextField(max_length=5000)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created", "id"]


class Profile(models.Model):
    """Per-user state: the last query of the global query page."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="racs_profile")
    last_query = models.TextField(blank=True, default="")
