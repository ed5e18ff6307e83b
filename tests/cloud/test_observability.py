"""One logging style for the Lambda code, and its level reaching every module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

LAMBDA_CODE = [REPO / "app.py", *sorted((REPO / "chalicelib").glob("*.py"))]


def _module_loggers(path) -> list[str]:
    """The source of each module-level `... = <call>` whose call makes a logger."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            text = ast.unparse(node.value)
            if "Logger(" in text or "getLogger(" in text:
                found.append(text)
    return found


def test_every_module_logs_through_a_powertools_child_logger() -> None:
    logging_modules = []
    for path in LAMBDA_CODE:
        source = path.read_text(encoding="utf-8")
        assert "import logging" not in source, f"{path.name}: stdlib logging (no level in Lambda)"
        loggers = _module_loggers(path)
        if "logger." in source:
            logging_modules.append(path.name)
            if path.name != "observability.py":
                assert loggers == ["Logger(child=True)"], (path.name, loggers)
    assert {"ingest.py", "trigger.py", "completion.py", "packaging.py",
            "rollouts.py"} <= set(logging_modules)


@pytest.mark.parametrize(("level", "shown"), [("INFO", True), ("WARNING", False)])
def test_the_stage_log_level_reaches_child_module_info_lines(level, shown) -> None:
    code = ("from chalicelib import trigger\n"
            "from chalicelib.observability import correlated\n"
            "with correlated(model='m', version=3, job='j'):\n"
            "    trigger.logger.info('hello from a module')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env(POWERTOOLS_LOG_LEVEL=level), timeout=60, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not shown:
        assert lines == []
        return
    (line,) = lines
    assert (line["level"], line["message"], line["model"], line["version"], line["job"]) == (
        "INFO", "hello from a module", "m", 3, "j")
    assert line["service"] == "mledgedeploy"
