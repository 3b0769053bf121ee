"""Admin site: the site's own tables are editable; the pipeline's are shown read-only."""
from django.contrib import admin

from .models import Claim, Comment, Crossmatch, Image, Profile, Tag, TagEvent


class ReadOnly(admin.ModelAdmin):
    """The pipeline owns these tables: no adding, changing or deleting here."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Image)
class ImageAdmin(ReadOnly):
    list_display = ("id", "name", "description", "ra", "dec", "matched_to", "number_candidates", "runtime")
    search_fields = ("name", "description")


@admin.register(Crossmatch)
class CrossmatchAdmin(ReadOnly):
    list_display = ("id", "image_id", "master_name", "transient_type", "ratio", "vs", "m", "pipelinetag")
    search_fields = ("master_name",)
    list_filter = ("transient_type", "survey")


@admin.register(Tag)
class TagAdmin(admin.ModelAdmin):
    list_display = ("image_id", "master_name", "usertag", "userreason", "user", "updated")
    list_filter = ("usertag",)


admin.site.register(TagEvent)
admin.site.register(Claim)
admin.site.register(Comment)
admin.site.register(Profile)
