"""factory-boy factories for the portal's models."""

import factory
from django.utils import timezone

from events.event_types import RouteType
from events.models import Feed, InboundBatch
from integrations.models import Connection, Delivery, DeliveryAttempt

# A secret Authorization header and trigger token that tests search for in pages, logs and records.
SECRET_HEADER = "Bearer FAKE-TOKEN-1234567890abcdef"
URL_TOKEN = "8c4e1f2a-6b3d-4e5f-9a7b-1c2d3e4f5a6b"
TEST_POST_URL = f"https://iad1.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId={URL_TOKEN}"


class FeedFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Feed
        skip_postgeneration_save = True

    name = factory.Sequence(lambda n: f"feed-{n}")

    @factory.post_generation
    def secret(self, create: bool, extracted: str | None, **kwargs: object) -> None:
        """Set a new secret, kept in plain text on the instance as `plain_secret` for tests."""
        self.plain_secret = self.set_new_secret()
        if create:
            self.save()


class ConnectionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Connection

    name = factory.Sequence(lambda n: f"connection-{n}")
    post_url = TEST_POST_URL
    authorization = "Basic dGVzdDp0ZXN0LXRva2Vu"
    event_types = factory.LazyFunction(lambda: [t.value for t in RouteType])
    send_as_batch = False


class InboundBatchFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = InboundBatch

    feed = factory.SubFactory(FeedFactory)
    body = '{"events": []}'
    body_bytes = factory.LazyAttribute(lambda batch: len(batch.body.encode()))


class DeliveryFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Delivery

    connection = factory.SubFactory(ConnectionFactory)
    payload = '{"events":[{"event_type":"custom_event"}]}'
    event_count = 1
    event_types = factory.LazyFunction(lambda: [RouteType.CUSTOM_EVENT.value])


class DeliveryAttemptFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = DeliveryAttempt

    delivery = factory.SubFactory(DeliveryFactory)
    number = factory.Sequence(lambda n: n + 1)
    started_at = factory.LazyFunction(timezone.now)
    duration_ms = 120
    status_code = 500
    error = "HTTP 500"
