"""Access rules of the management API: staff users, limited by their Django model permissions."""

from typing import Any

from rest_framework.permissions import DjangoModelPermissions, IsAdminUser
from rest_framework.request import Request
from rest_framework.views import APIView


class StaffModelPermissions(DjangoModelPermissions):
    """Staff only; reading needs the model's view permission, writing its add, change or delete permission.

    A read-only operator is a staff user with only view permissions: they see
    deliveries and connections (secrets are never returned) but change nothing.
    """

    perms_map = {
        **DjangoModelPermissions.perms_map,
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
        "OPTIONS": ["%(app_label)s.view_%(model_name)s"],
    }

    def has_permission(self, request: Request, view: APIView) -> bool:
        return IsAdminUser().has_permission(request, view) and super().has_permission(request, view)


class StaffChangePermission(StaffModelPermissions):
    """For actions sent with POST that change existing objects (replay, pause, resume, rotate secret)."""

    def get_required_permissions(self, method: str, model_cls: Any) -> list[str]:
        meta = {"app_label": model_cls._meta.app_label, "model_name": model_cls._meta.model_name}
        return ["{app_label}.change_{model_name}".format(**meta)]
