"""The core: exact byte tables, minimal aligned chunks and the shared vocabulary (numpy only)."""
