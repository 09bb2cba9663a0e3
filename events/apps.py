from django.apps import AppConfig


class EventsConfig(AppConfig):
    name = "events"
    verbose_name = "Inbound mParticle events"

    def ready(self) -> None:
        import events.schema  # noqa: F401  (registers the OpenAPI extension)
