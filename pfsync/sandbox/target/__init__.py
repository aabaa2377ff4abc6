"""The sandbox target: a FHIR server that behaves like Medplum (docs/medplum.md), as strict as the
recorded cases, with quotas and fault injection for the tests.

May import: pfsync.sandbox's shared modules only; never the product packages.
"""
