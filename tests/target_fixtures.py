"""pytest fixtures for the target (Medplum-like) sandbox. Owned by the target sandbox work."""
