"""Datasets for the three stages. ``build_task(cfg.data)`` returns the task named by ``data.name``."""

from marl_exp.data.task import Task, build_task

__all__ = ["Task", "build_task"]
