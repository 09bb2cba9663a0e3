"""Admin pages for trying a connection out: send the sample payload, and preview a batch's routing."""

import json
from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from events.models import InboundBatch
from integrations import jsontext, preview
from integrations.delivery import attempt_headers
from integrations.models import Connection, Delivery
from integrations.secrets import mask_secret, mask_url
from integrations.transport import post_json
from portal.conf import portal_setting


def sample_body(connection: Connection) -> str | None:
    """Return one body with every routed event type of the sample batch, shaped by the connection's settings."""
    result = preview.preview(
        preview.sample_batch(),
        connection.shaping_settings(),
        portal_setting("MAX_PAYLOAD_BYTES"),
        as_batch=True,
    )
    return result.bodies[0] if result.bodies else None


def send_sample(request: HttpRequest, model_admin: admin.ModelAdmin, connection: Connection) -> HttpResponse:  # type: ignore[type-arg]
    """POST the sample body to the connection now and show the request and response, secrets masked."""
    body = sample_body(connection)
    context = {
        **model_admin.admin_site.each_context(request),
        "title": f"Sample payload for {connection}",
        "opts": Connection._meta,
        "connection": connection,
        "body": body,
    }
    if body is not None:
        headers = attempt_headers(Delivery(connection=connection))
        outcome = post_json(
            connection.post_url,
            body.encode("utf-8"),
            headers,
            connect_timeout=portal_setting("CONNECT_TIMEOUT_SECONDS"),
            total_timeout=portal_setting("TOTAL_TIMEOUT_SECONDS"),
            verify=portal_setting("CA_BUNDLE") or True,
        )
        shown_headers = {**headers, "Authorization": mask_secret(headers.get("Authorization"))}
        context |= {
            "url": mask_url(connection.post_url),
            "headers": json.dumps(shown_headers, indent=2),
            "pretty_body": json.dumps(json.loads(body), indent=2, ensure_ascii=False),
            "outcome": outcome,
        }
    model_admin.log_change(request, connection, "Sent the sample payload.")
    return TemplateResponse(request, "admin/integrations/connection/sample_result.html", context)


class PreviewForm(forms.Form):
    batch = forms.ModelChoiceField(
        InboundBatch.objects.order_by("-pk"),
        required=False,
        help_text="A stored inbound batch; or paste a batch below.",
    )
    body = forms.CharField(widget=forms.Textarea(attrs={"rows": 12, "cols": 100}), required=False, label="Batch JSON")

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        batch, body = cleaned.get("batch"), cleaned.get("body", "").strip()
        if batch is None and not body:
            raise forms.ValidationError("Pick a stored batch or paste a batch.")
        text = body or (batch.body if batch is not None else "")
        try:
            parsed = jsontext.parse(text)
        except jsontext.InvalidJSON as error:
            raise forms.ValidationError(f"The batch is not valid JSON: {error}.") from error
        if not isinstance(parsed, dict):
            raise forms.ValidationError("The batch must be a JSON object.")
        cleaned["parsed"] = parsed
        return cleaned


def preview_view(request: HttpRequest, model_admin: admin.ModelAdmin) -> HttpResponse:  # type: ignore[type-arg]
    """Show, per active connection, what a batch would produce and why each event is routed or not."""
    form = PreviewForm(request.POST or None, initial={"batch": request.GET.get("batch")})
    results = []
    if request.method == "POST" and form.is_valid():
        for connection in Connection.objects.filter(active=True).order_by("name"):
            result = preview.preview(
                form.cleaned_data["parsed"],
                connection.shaping_settings(),
                portal_setting("MAX_PAYLOAD_BYTES"),
                as_batch=connection.send_as_batch,
            )
            results.append({"connection": connection, "result": result, "pretty": [_pretty(b) for b in result.bodies]})
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "Preview routing and payloads",
        "opts": Connection._meta,
        "form": form,
        "results": results,
    }
    return TemplateResponse(request, "admin/integrations/connection/preview.html", context)


def _pretty(body: str) -> str:
    return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
