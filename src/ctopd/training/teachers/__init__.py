"""Teachers, in one place, behind one interface (:class:`~ctopd.training.teachers.local.Teacher`).

* :mod:`~ctopd.training.teachers.local` — the interface, the in-process teacher
  (:class:`~ctopd.training.teachers.local.LocalTeacher`) and :func:`load_teacher`, which picks
  the in-process model or the served client from the config.
* :mod:`~ctopd.training.teachers.served` — the client of an OpenAI-compatible completions server
  (vLLM, ``ctopd serve-teacher``).
* :mod:`~ctopd.training.teachers.server` — ``ctopd serve-teacher``'s scoring server.
"""

from ctopd.training.teachers.local import (
    LocalTeacher,
    PendingOutputs,
    Teacher,
    TeacherServerError,
    load_teacher,
    receive_outputs,
)

__all__ = [
    "LocalTeacher",
    "PendingOutputs",
    "Teacher",
    "TeacherServerError",
    "load_teacher",
    "receive_outputs",
]
