from django.contrib import admin
from django.urls import path

from routing.api import api

admin.site.site_header = "Keyaos"
admin.site.site_title = "Keyaos admin"
admin.site.index_title = "Gateway administration"

urlpatterns = [
    path("v1/", api.urls),
    path("admin/", admin.site.urls),
]
