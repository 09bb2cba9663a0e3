"""Inbound feeds and the batches mParticle posts to them."""

import hashlib
import hmac
import secrets

from django.db import models
from django.db.models import Q

SECRET_PREFIX = "mpf_"


def hash_feed_secret(secret: str) -> str:
    """Return the SHA-256 hex digest under which a feed secret is stored.

    Feed secrets are 256-bit random tokens, so a fast unsalted hash is enough
    to keep the stored value useless to a reader of the database.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class FeedQuerySet(models.QuerySet["Feed"]):
    def authenticate(self, secret: str) -> "Feed | None":
        """Return the active feed whose secret is `secret`, or None."""
        digest = hash_feed_secret(secret)
        feed = self.filter(active=True, secret_hash=digest).first()
        if feed is None or not hmac.compare_digest(feed.secret_hash, digest):
            return None
        return feed


class Feed(models.Model):
    """One mParticle Webhook output that posts to the portal, with its own secret."""

    name = models.CharField(max_length=200, unique=True)
    active = models.BooleanField(default=True, help_text="Inactive feeds are rejected with 401.")
    secret_hash = models.CharField(max_length=64, unique=True, editable=False)
    secret_hint = models.CharField(
        max_length=16, editable=False, help_text="The last characters of the secret, to tell feeds apart."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = FeedQuerySet.as_manager()

    def __str__(self) -> str:
        return self.name

    def set_new_secret(self) -> str:
        """Generate, store (hashed) and return a new secret; the caller shows it once."""
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        self.secret_hash = hash_feed_secret(secret)
        self.secret_hint = "…" + secret[-4:]
        return secret


class InboundBatch(models.Model):
    """One accepted mParticle POST body, stored verbatim before anything else happens.

    The body is kept as the received text, not as parsed JSON, so that no
    database or JSON layer can reorder keys or round numbers.
    """

    class Status(models.TextChoices):
        RECEIVED = "received", "Received"
        ROUTED = "routed", "Routed"
        FAILED = "failed", "Failed"

    feed = models.ForeignKey(Feed, on_delete=models.PROTECT, related_name="batches")
    # NULL, not "", for a batch without one, so the unique constraint skips it.
    source_request_id = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
    body = models.TextField()
    body_bytes = models.PositiveIntegerField()
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RECEIVED, db_index=True)
    routed_at = models.DateTimeField(null=True, blank=True)
    event_count = models.PositiveIntegerField(null=True, blank=True)
    routing_attempts = models.PositiveIntegerField(
        default=0, help_text="Routing runs that failed with an error; the batch fails after several."
    )
    error = models.TextField(blank=True)

    class Meta:
        verbose_name_plural = "inbound batches"
        ordering = ["-received_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["feed", "source_request_id"],
                condition=Q(source_request_id__isnull=False),
                name="unique_source_request_per_feed",
            )
        ]

    def __str__(self) -> str:
        return f"Batch {self.pk} from {self.feed}"


class SeenEvent(models.Model):
    """The first sighting of an event by a connection, for de-duplicating repeated uploads."""

    connection = models.ForeignKey("integrations.Connection", on_delete=models.CASCADE, related_name="+")
    mpid = models.CharField(max_length=64)
    source_message_id = models.CharField(max_length=200)
    batch = models.ForeignKey(InboundBatch, on_delete=models.CASCADE, related_name="+")
    seen_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["connection", "source_message_id", "mpid"], name="unique_seen_event")
        ]

    def __str__(self) -> str:
        return f"{self.mpid}/{self.source_message_id}"
