"""Loading: from NDJSON lines to Medplum writes. Preparation (identifiers, reference rendering),
dependency order, the id map, reference resolution, attachments, quarantine and the retry queue.

May import: pfsync.core, pfsync.net, pfsync.medplum, pfsync.source (the export folder's files).
"""
