"""pfsync: sync an EHR's FHIR Bulk Data export into Medplum, incrementally and without duplicates."""

from pfsync._version import __version__

__all__ = ["__version__"]
