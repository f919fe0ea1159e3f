"""`retune --help` groups its commands by who runs them: researchers, hospital IT, consortium operators."""

from __future__ import annotations

from typer.testing import CliRunner

from deploy.cli import HOSPITAL_IT, OPERATOR, RESEARCHER, app


def test_every_command_is_in_one_of_the_three_panels():
    panels = {info.name or info.callback.__name__: info.rich_help_panel for info in app.registered_commands}
    panels |= {info.name: info.rich_help_panel for info in app.registered_groups}
    assert {p for p in panels.values()} == {RESEARCHER, HOSPITAL_IT, OPERATOR}, panels
    assert panels["simulate"] == RESEARCHER and panels["hospital"] == HOSPITAL_IT and panels["server"] == OPERATOR
    shown = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "160"}).output
    assert shown.index(RESEARCHER) < shown.index(HOSPITAL_IT) < shown.index(OPERATOR)
    assert "─ Commands ─" not in shown  # nothing left outside a panel
