"""Foundations every other package stands on: the error tree, events and logging, redaction of
secrets, private files, settings, NDJSON reading, FHIR type names.

May import: the standard library and third-party packages only, never another pfsync package.
"""
