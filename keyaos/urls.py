from django.contrib import admin
from django.urls import path

from keyaos.dashboard.pages import install_dashboard_index
from routing.api import api

admin.site.site_header = "Keyaos"
admin.site.site_title = "Keyaos admin"
admin.site.index_title = "Gateway administration"
install_dashboard_index(admin.site)

urlpatterns = [
    path("v1/", api.urls),
    path("admin/", admin.site.urls),
]
