from django.contrib import admin
from django.http import HttpRequest, HttpResponseRedirect
from django.templatetags.static import static
from django.urls import path
from django.views.generic import RedirectView

from routing.api import api

admin.autodiscover()


def favicon(request: HttpRequest) -> HttpResponseRedirect:
    return HttpResponseRedirect(static("keyaos/favicon.svg"))


urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:index")),
    path("favicon.ico", favicon),
    path("v1/", api.urls),
    path("admin/", admin.site.urls),
]
