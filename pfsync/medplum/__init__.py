"""The Medplum side: client credentials, batch Bundles and their outcomes, async batches, identifier
lookups. Knows Medplum's request and answer shapes, nothing about where resources come from.

May import: pfsync.core, pfsync.net. Never pfsync.source.
"""
