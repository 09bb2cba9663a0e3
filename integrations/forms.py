"""Admin forms for Qualtrics connections.

The POST URL and the Authorization header are write-only in these forms: the
inputs never render a stored value, and a blank input on edit keeps what is
stored. The current values appear only masked, in the help text.
"""

import base64
from typing import Any, cast

from django import forms
from django.core.exceptions import ValidationError
from django.utils.functional import cached_property
from django.utils.html import format_html

from events.event_types import RouteType
from integrations import preview
from integrations.metadata_fields import MetadataField
from integrations.models import Connection
from integrations.secrets import mask_secret, mask_url

POST_URL_HELP = (
    "The workflow's JSON Event trigger URL, "
    "https://&lt;datacenter&gt;.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId=…"
)
AUTHORIZATION_HELP = (
    "The full header value, for example <code>Basic dXNlcjp0b2tlbg==</code>, or fill in the username "
    "and API token below instead. Blank sends no header."
)
MPARTICLE_SETTING_FIELDS = (
    "include_mp_deviceid",
    "unique_id",
    "send_as_batch",
    "batch_window_seconds",
    "send_crash_events",
    "include_location",
    "send_network_performance_events",
    "include_metadata",
    "include_user_attribute_change_events",
    "include_user_identity_change_events",
    "send_batches_without_events",
    "include_event_batch_location",
    "send_alias_requests",
    "send_validation_results",
    "raw_data_feed",
)
DELIVERY_POLICY_FIELDS = (
    "max_attempts",
    "max_age_seconds",
    "rate_limit_per_minute",
    "concurrency_limit",
    "breaker_failure_ratio",
    "breaker_min_attempts",
)
CREDENTIAL_FIELDS = ("qualtrics_username", "qualtrics_api_token", "remove_authorization")


def validate_header_value(value: str) -> None:
    """Raise ValidationError when `value` contains control characters, which an HTTP header value cannot carry."""
    if any(ord(character) < 32 or ord(character) == 127 for character in value):
        raise ValidationError("The Authorization header must be one line without control characters.")


def basic_authorization(username: str, token: str) -> str:
    """Return the `Basic base64(username:token)` header value that Qualtrics accepts."""
    credentials = f"{username}:{token}".encode()
    return "Basic " + base64.b64encode(credentials).decode("ascii")


class WriteOnlyTextInput(forms.TextInput):
    """A text input that never renders a value, so a stored secret is not sent to the browser."""

    def get_context(self, name: str, value: Any, attrs: dict[str, Any] | None) -> dict[str, Any]:
        return super().get_context(name, None, attrs)


class LineListField(forms.Field):
    """A list of strings edited as one value per line. Blank lines, repeats and surrounding spaces are dropped."""

    widget = forms.Textarea(attrs={"rows": 4})

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return "\n".join(str(item) for item in value)
        return value

    def to_python(self, value: Any) -> list[str]:
        if not value:
            return []
        if isinstance(value, list):
            return [str(item) for item in value]
        lines = (line.strip() for line in str(value).splitlines())
        return list(dict.fromkeys(line for line in lines if line))


class ConnectionForm(forms.ModelForm):  # type: ignore[type-arg]
    """Connection form with the routing and settings as choices and the secrets write-only.

    On edit, a blank POST URL or Authorization input keeps the stored value,
    and only `remove_authorization` removes the stored header.
    """

    post_url = forms.CharField(
        label="POST URL",
        required=False,
        strip=True,
        widget=WriteOnlyTextInput(attrs={"class": "vLargeTextField", "autocomplete": "off"}),
    )
    authorization = forms.CharField(
        label="Authorization header",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"class": "vLargeTextField", "autocomplete": "off"}),
    )
    qualtrics_username = forms.CharField(
        label="Qualtrics username",
        required=False,
        strip=True,
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
        help_text="With the API token, builds the header Basic base64(username:token).",
    )
    qualtrics_api_token = forms.CharField(
        label="Qualtrics API token",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
    )
    remove_authorization = forms.BooleanField(
        label="Remove the Authorization header",
        required=False,
        help_text="Sends no Authorization header from now on, for triggers that need none.",
    )
    event_types = forms.MultipleChoiceField(
        choices=RouteType.choices,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="The event types routed to this connection. None selected routes nothing.",
    )
    metadata_exclusions = forms.MultipleChoiceField(
        label="Metadata field exclusion",
        choices=MetadataField.choices,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Removes each chosen metadata field from every payload.",
    )
    custom_event_names = LineListField(
        required=False,
        help_text="One event name per line. If set, only custom events whose event_name equals one of these "
        "(exact, case-sensitive) pass.",
    )
    custom_event_types = LineListField(
        required=False,
        help_text="One custom event type per line. If set, only custom events whose custom_event_type is one "
        "of these (exact, case-sensitive) pass.",
    )

    class Meta:
        model = Connection
        fields = (
            "name",
            "active",
            "post_url",
            "authorization",
            "feeds",
            "event_types",
            "custom_event_names",
            "custom_event_types",
            "environment",
            *MPARTICLE_SETTING_FIELDS,
            "metadata_exclusions",
            *DELIVERY_POLICY_FIELDS,
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initial["post_url"] = ""
        self.initial["authorization"] = ""
        self._describe_secret_fields()

    @property
    def is_add(self) -> bool:
        return self.instance.pk is None

    def _describe_secret_fields(self) -> None:
        post_url = self.fields["post_url"]
        post_url.required = self.is_add
        if self.is_add:
            post_url.help_text = POST_URL_HELP
            self.fields["authorization"].help_text = AUTHORIZATION_HELP
            self.fields.pop("remove_authorization", None)
            return
        post_url.help_text = format_html(
            "Current: <code>{}</code>. Leave blank to keep it, or enter a new trigger URL.",
            mask_url(self.instance.post_url),
        )
        current = mask_secret(self.instance.authorization)
        self.fields["authorization"].help_text = (
            format_html("Current: <code>{}</code>. Leave blank to keep it. ", current) if current else "None set. "
        ) + AUTHORIZATION_HELP

    def clean_post_url(self) -> str:
        value: str = self.cleaned_data["post_url"]
        if not value and not self.is_add:
            return self.instance.post_url
        return value

    def clean_authorization(self) -> str:
        value: str = self.cleaned_data["authorization"]
        validate_header_value(value)
        return value

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        try:
            cleaned["authorization"] = self._resolve_authorization(cleaned)
        except ValidationError as error:
            self.add_error(None, error)
        return cleaned

    def _resolve_authorization(self, cleaned: dict[str, Any]) -> str:
        """Return the header to store: pasted, built from username and token, removed, or kept."""
        pasted = cleaned.get("authorization", "")
        username = cleaned.get("qualtrics_username", "")
        token = cleaned.get("qualtrics_api_token", "")
        remove = cleaned.get("remove_authorization", False)

        if username or token:
            if pasted or remove:
                raise ValidationError("Enter a full Authorization header or a username and API token, not both.")
            return self._build_basic(username, token)
        if pasted and remove:
            raise ValidationError("Enter a new Authorization header or remove it, not both.")
        if pasted or remove or self.is_add:
            return str(pasted)
        return self.instance.authorization

    def _build_basic(self, username: str, token: str) -> str:
        if not username:
            self.add_error("qualtrics_username", "Enter the username that belongs to the API token.")
        if not token:
            self.add_error("qualtrics_api_token", "Enter the API token of this username.")
        if username and ":" in username:
            self.add_error("qualtrics_username", "A username with a colon cannot be sent as Basic credentials.")
        header = basic_authorization(username, token)
        validate_header_value(header)
        return header

    @cached_property
    def changed_data(self) -> list[str]:
        """Return the changed fields, naming the Authorization header instead of the inputs that replace it.

        Only names are returned, so the admin's change history never records a secret.
        """
        changed = super().changed_data
        names = [name for name in changed if name not in CREDENTIAL_FIELDS]
        if len(names) < len(changed) and "authorization" not in names:
            names.append("authorization")
        return names


FULL_SAMPLE = ""


def sample_type_choices() -> list[tuple[str, str]]:
    """Return a choice per event and notification type of the built-in sample batch, in its order."""
    batch = preview.sample_batch()
    types = [str(event.get("event_type")) for event in batch.get("events", []) if isinstance(event, dict)]
    types += [str(note.get("type")) for note in batch.get("system_notifications", []) if isinstance(note, dict)]
    labels = dict(RouteType.choices)
    choices = [(FULL_SAMPLE, "The full sample payload (every type this connection routes)")]
    for value in dict.fromkeys(types):
        label = labels.get(value) or f"{value} (routed as Other)"
        choices.append((value, label))
    return choices


class SampleSendForm(forms.Form):
    """The choice of what a test send POSTs: the full sample batch or one of its events."""

    event_type = forms.ChoiceField(
        label="Send",
        required=False,
        help_text="One event type of the sample batch, shaped by this connection's settings, or all of it.",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cast(forms.ChoiceField, self.fields["event_type"]).choices = sample_type_choices()


class PauseForm(forms.Form):
    reason = forms.CharField(
        max_length=300,
        required=False,
        widget=forms.TextInput(attrs={"class": "vLargeTextField"}),
        help_text="Shown in the connection list while it is paused. Optional.",
    )
