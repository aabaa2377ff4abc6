"""The source side: SMART Backend Services authentication (signing keys, client assertions, tokens)
and the FHIR Bulk Data export (kick-off, status polling, manifest, downloads, the export folder).

May import: pfsync.core, pfsync.net. Never pfsync.medplum: the two sides do not know each other.
"""
