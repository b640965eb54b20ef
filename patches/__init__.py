"""Runtime patches for upstream ChatGLM remote code and libraries, applied in memory, never by copying files."""
