"""URLs of racs_web: the review app, accounts (no sign-up) and the admin site."""
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("accounts/password_change/", auth_views.PasswordChangeView.as_view(), name="password_change"),
    path("accounts/password_change/done/", auth_views.PasswordChangeDoneView.as_view(),
         name="password_change_done"),
    path("", include("racs_web.review.urls")),
]

from racs_web.review.views import error_page  # noqa: E402

handler400 = error_page(400, "Bad request")
handler403 = error_page(403, "Forbidden")
handler404 = error_page(404, "Not found")
handler500 = error_page(500, "Server error")
