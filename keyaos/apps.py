from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class KeyaosConfig(AppConfig):
    name = "keyaos"


class KeyaosAdminConfig(admin_apps.SimpleAdminConfig):
    """``django.contrib.admin`` with the Keyaos site as ``admin.site``.

    The admin modules are discovered by ``keyaos.urls`` (the first page, or the URL checks),
    not at start-up: a ``manage.py`` command that needs no page does not import them.
    """

    default = False
    default_site = "keyaos.admin_site.KeyaosAdminSite"
