"""Objectives: SimCT, DPCA and the baselines, looked up by name (docs/concepts/: simct.md, dpca.md, baselines.md)."""

from ctopd.objectives.divergences import DIVERGENCES, divergence
from ctopd.objectives.dpca import dpca_advantages
from ctopd.objectives.registry import (
    OBJECTIVES,
    TEACHER_NEEDS,
    compute_objective,
    load_objective,
    objective_options,
    register_objective,
    teacher_needs,
)
from ctopd.objectives.student_head import StudentHead, StudentHidden
from ctopd.objectives.teacher import TeacherOutputs, TeacherRequest, reduce_teacher, teacher_outputs

__all__ = [
    "DIVERGENCES",
    "OBJECTIVES",
    "StudentHead",
    "StudentHidden",
    "TEACHER_NEEDS",
    "TeacherOutputs",
    "TeacherRequest",
    "compute_objective",
    "divergence",
    "dpca_advantages",
    "load_objective",
    "objective_options",
    "reduce_teacher",
    "register_objective",
    "teacher_needs",
    "teacher_outputs",
]
