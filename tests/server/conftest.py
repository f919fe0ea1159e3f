"""Fixtures of the server tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a ServerApp process has: Flower stamps every new Message with the task's run id (restored after)."""
    from flwr.supercore.task_identity import TaskIdentity

    for field, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, field, value)
