"""Curriculum teachers: one file per teacher, registered by name.

A teacher is a class ``Teacher(bounds, rng, **params)`` over a box of task parameters
(``bounds``: one (low, high) row per dimension, e.g. operand digits and carries scaled to
[0, 1]) with two methods: ``sample() -> task`` (a point of the box) and ``update(task,
reward)`` (the student's reward on that task, e.g. its accuracy on a few of its prompts). The
stage calls ``sample``, trains the student on the task, scores it, calls ``update``.
"""
from lib.core.registry import Registry

TEACHERS = Registry("curriculum teacher", package="lib.curricula.teachers")
