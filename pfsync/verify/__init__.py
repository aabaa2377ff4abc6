"""Verification: compare an export with what Medplum holds (counts, content hashes, references) and
repair what differs through the loader.

May import: pfsync.core, pfsync.net, pfsync.source, pfsync.medplum, pfsync.load.
"""
