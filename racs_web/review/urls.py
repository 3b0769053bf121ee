"""URLs of the review app.  A source is addressed by its run id and master_name."""
from django.urls import path, register_converter

from . import views


class SourceName:
    """master_name as the pipeline writes it (e.g. SUMSS_J000123.45-350012.3)."""

    regex = r"[A-Za-z0-9_.+\-]{1,64}"

    def to_python(self, value):
        return value

    def to_url(self, value):
        return value


register_converter(SourceName, "source")

urlpatterns = [
    path("", views.home, name="home"),
    path("run/<int:image_id>/", views.run_detail, name="run"),
    path("run/<int:image_id>/plot/<int:index>/", views.run_plot, name="plot"),
    path("run/<int:image_id>/claim/", views.claim, name="claim"),
    path("run/<int:image_id>/unclaim/", views.unclaim, name="unclaim"),
    path("run/<int:image_id>/comment/", views.comment, name="comment"),
    path("run/<int:image_id>/crossmatches/", views.run_crossmatches, name="crossmatches"),
    path("run/<int:image_id>/source/<source:name>/", views.source_detail, name="source"),
    path("run/<int:image_id>/source/<source:name>/stamp/", views.source_stamp, name="stamp"),
    path("run/<int:image_id>/source/<source:name>/tag/", views.tag, name="tag"),
    path("run/<int:image_id>/source/<source:name>/slack/", views.slack, name="slack"),
    path("query/", views.query, name="query"),
    path("search/", views.tag_search, name="search"),
    path("hotkeys/", views.hotkeys, name="hotkeys"),
]
