"""The routable kinds of mParticle data and the labels operators see.

mParticle's documented `event_type` values are routed by name. GDPR and CCPA
consent changes are not events but entries of a batch's
`system_notifications` array; they are routed by their `type`. Any other
event type (`first_run`, `validation_result`, `alias`, ...) is routed as
`other`.
"""

from django.db import models


class RouteType(models.TextChoices):
    APPLICATION_STATE_TRANSITION = "application_state_transition", "Application State Transition"
    BREADCRUMB = "breadcrumb", "Breadcrumb"
    COMMERCE_EVENT = "commerce_event", "Commerce Event"
    CUSTOM_EVENT = "custom_event", "Custom Event"
    CRASH_REPORT = "crash_report", "Crash Report"
    NETWORK_PERFORMANCE = "network_performance", "Network Performance"
    OPT_OUT = "opt_out", "Opt Out"
    PROFILE = "profile", "Profile"
    PUSH_REGISTRATION = "push_registration", "Push Registration"
    PUSH_MESSAGE = "push_message", "Push Message"
    SCREEN_VIEW = "screen_view", "Screen View"
    SESSION_START = "session_start", "Session Start"
    SESSION_END = "session_end", "Session End"
    UNINSTALL = "uninstall", "Uninstall"
    USER_ATTRIBUTE_CHANGE = "user_attribute_change", "User Attribute Change"
    USER_IDENTITY_CHANGE = "user_identity_change", "User Identity Change"
    GDPR_CHANGE = "gdpr_change", "GDPR Consent Change"
    CCPA_CHANGE = "ccpa_change", "CCPA Consent Change"
    OTHER = "other", "Other (unknown event types)"


EVENT_ROUTE_TYPES = frozenset(RouteType.values) - {RouteType.GDPR_CHANGE, RouteType.CCPA_CHANGE, RouteType.OTHER}
NOTIFICATION_ROUTE_TYPES = frozenset({RouteType.GDPR_CHANGE.value, RouteType.CCPA_CHANGE.value})


def route_type_of_event(event_type: object) -> str:
    """Return the route type of an event's `event_type` value; unknown values route as `other`."""
    if isinstance(event_type, str) and event_type in EVENT_ROUTE_TYPES:
        return event_type
    return RouteType.OTHER.value


def route_type_of_notification(notification_type: object) -> str | None:
    """Return the route type of a system notification, or None when it is not a routable consent change."""
    if isinstance(notification_type, str) and notification_type in NOTIFICATION_ROUTE_TYPES:
        return notification_type
    return None
