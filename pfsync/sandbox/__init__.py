"""Local sandbox servers: a Practice Fusion-like Bulk Data source and a Medplum-like target, on loopback."""
