from django.apps import AppConfig


class ReviewConfig(AppConfig):
    name = "racs_web.review"
    label = "review"
    verbose_name = "RACS review"
    default_auto_field = "django.db.models.BigAutoField"
