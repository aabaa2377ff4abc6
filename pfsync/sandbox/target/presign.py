"""Presigned storage URLs of the target sandbox: attachment urls `Binary/<id>` in resources it
sends become signed, expiring `storage/<id>/<vid>` URLs (docs/medplum.md, recorded case 38), and
the storage route checks their signature. The signing key is kept in the store, so URLs survive a
restart.

May import: pfsync.sandbox.target's store and common modules.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from typing import Any

from pfsync.sandbox.target.common import Json, new_id
from pfsync.sandbox.target.store import Store

BINARY_REF_RE = re.compile(r"^Binary/([0-9a-fA-F-]{36})$")
# Resource types whose Attachments may point at Binary/<id> (presigned on output: docs/medplum.md, recorded case 38).
ATTACHMENT_TYPES = {
    "DocumentReference",
    "DiagnosticReport",
    "Patient",
    "Practitioner",
    "Media",
    "Communication",
    "Questionnaire",
    "QuestionnaireResponse",
    "Consent",
    "Contract",
    "Observation",
}
PRESIGN_SECONDS = 3600


class Presigner:
    """Signs and checks storage URLs for the Binaries of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        key = store.get_setting("presign_key")
        if key is None:
            key = base64.b64encode(hashlib.sha256(new_id().encode()).digest()).decode()
            store.set_setting("presign_key", key)
        self._presign_key = key.encode()

    def present(self, base: str, resource: Json) -> Json:
        """A resource as the server sends it: attachment urls `Binary/<id>` become presigned storage URLs."""
        if resource.get("resourceType") not in ATTACHMENT_TYPES:
            return resource
        return self._presign_walk(base, resource)  # type: ignore[no-any-return]

    def _presign_walk(self, base: str, node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "url" and isinstance(v, str) and BINARY_REF_RE.match(v):
                    out[k] = self.presigned_url(base, v.split("/", 1)[1]) or v
                else:
                    out[k] = self._presign_walk(base, v) if isinstance(v, dict | list) else v
            return out
        if isinstance(node, list):
            return [self._presign_walk(base, v) for v in node]
        return node

    def presigned_url(self, base: str, binary_id: str) -> str | None:
        row = self.store.read("Binary", binary_id)
        if row is None or row.deleted:
            return None
        expires = int(time.time()) + PRESIGN_SECONDS
        sig = self._signature(binary_id, row.vid, expires)
        return f"{base}storage/{binary_id}/{row.vid}?Expires={expires}&Signature={sig}"

    def _signature(self, binary_id: str, vid: str, expires: int) -> str:
        mac = hmac.new(self._presign_key, f"{binary_id}/{vid}/{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def check_signature(self, binary_id: str, vid: str, expires: str, signature: str) -> bool:
        try:
            exp = int(expires)
        except ValueError:
            return False
        return exp >= time.time() and hmac.compare_digest(self._signature(binary_id, vid, exp), signature)
