from django.apps import AppConfig


class ProvidersConfig(AppConfig):
    name = "providers"
    verbose_name = "Providers and catalog"

    def ready(self) -> None:
        from providers import identity  # noqa: F401
