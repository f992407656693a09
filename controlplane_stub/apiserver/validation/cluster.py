"""Namespaces, Leases and Events.
"""
from __future__ import annotations

from .fielderrors import FieldErrors, Obj
from .meta import _obj, _str, validate_object_meta
from .names import is_dns1123_label, is_dns1123_subdomain, is_qualified_name

# --- the rest of core/v1 and friends ---------------------------------------------------------------


def _validate_namespace(errs: FieldErrors, ns: Obj) -> None:
    validate_object_meta(errs, ns.get("metadata"), False, is_dns1123_label)
    for i, fin in enumerate((ns.get("spec") or {}).get("finalizers") or []):
        for msg in is_qualified_name(_str(fin)):
            errs.invalid(f"spec.finalizers[{i}]", fin, msg)


def _validate_lease(errs: FieldErrors, lease: Obj) -> None:
    validate_object_meta(errs, lease.get("metadata"), True, is_dns1123_subdomain)
    spec = _obj(lease.get("spec"))
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and (not isinstance(duration, int) or duration <= 0):
        errs.invalid("spec.leaseDurationSeconds", duration, "must be greater than 0")
    transitions = spec.get("leaseTransitions")
    if transitions is not None and (not isinstance(transitions, int) or transitions < 0):
        errs.invalid("spec.leaseTransitions", transitions, "must be greater than or equal to 0")


def _validate_event(errs: FieldErrors, event: Obj) -> None:
    validate_object_meta(errs, event.get("metadata"), True, is_dns1123_subdomain)
    involved = _obj(event.get("involvedObject"))
    ns = _str((event.get("metadata") or {}).get("namespace"))
    ins = _str(involved.get("namespace"))
    # Events about cluster-scoped objects live in "default" (or nowhere); others beside their object.
    if (not ins and ns not in ("", "default")) or (ins and ins != ns):
        errs.invalid("involvedObject.namespace", ins, "does not match event.namespace")
    etype = event.get("type")
    if etype and etype not in ("Normal", "Warning"):
        errs.not_supported("type", etype, ("Normal", "Warning"))
