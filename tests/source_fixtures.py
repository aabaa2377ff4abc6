"""pytest fixtures for the source (Bulk Data) sandbox. Owned by the source sandbox work."""
