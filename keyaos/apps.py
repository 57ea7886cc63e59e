from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class KeyaosConfig(AppConfig):
    name = "keyaos"


class KeyaosAdminConfig(admin_apps.AdminConfig):
    """``django.contrib.admin`` with the Keyaos site as ``admin.site``."""

    default = False
    default_site = "keyaos.admin_site.KeyaosAdminSite"
