"""Process start: what every command that touches a model does first, in one place."""

from __future__ import annotations

from glm_portable.backends import Backend
from glm_portable.patches import Context, apply_library_patches
from glm_portable.quiet import quiet_third_party


def start_process(backend: Backend) -> list[str]:
    """The backend's per-process setup, quieter third-party logs, then the library patches the installed
    stack needs (their names)."""
    backend.prepare_process()
    quiet_third_party()
    return apply_library_patches(Context.current(backend.name))
