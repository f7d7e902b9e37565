"""The `local` runtime: a stage as a subprocess of the Airflow worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Sequence

from airflow.sdk import BaseOperator

try:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # older task SDKs
    from airflow.exceptions import AirflowException, AirflowFailException

# `python -m tasks` exits with this status for invalid input or configuration, which a
# retry cannot fix.
USAGE_ERROR = 2


def stage_failure(stage: str, status: int, last_line: str, hint: str = "",
                  status_note: str = "") -> Exception:
    """Return the task error for a stage that exited with a non-zero `status`.

    Exit status 2 (rejected input) fails the task for good; any other status is retried.
    `hint` follows the rejected input's message and `status_note` the exit status.
    """
    if status == USAGE_ERROR:
        return AirflowFailException(f"stage {stage} rejected its input: {last_line}{hint}")
    return AirflowException(f"stage {stage} exited with status {status}{status_note}: "
                            f"{last_line}")


def parse_summary(stdout: str) -> dict:
    """Return the JSON summary a stage prints as its last line of stdout."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return {}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {}


class StageSubprocessOperator(BaseOperator):
    """Run `python -m tasks <stage> <arguments> <extra_arguments>` in a subprocess.

    Stage logs (stderr) stream into the task log line by line; the JSON summary on the
    last line of stdout becomes the task's XCom return value. Exit status 2 means bad
    input and fails the task without retries.
    """

    template_fields: Sequence[str] = ("arguments", "extra_arguments", "environment")
    ui_color = "#d8e8f8"

    def __init__(self, *, stage: str, arguments: list[str], extra_arguments: list[str] = (),
                 command_prefix: list[str] | None = None, environment: dict | None = None,
                 s3_conn_id: str = "", **kwargs):
        super().__init__(**kwargs)
        self.stage = stage
        self.arguments = list(arguments)
        self.extra_arguments = list(extra_arguments)
        self.command_prefix = command_prefix or ["-m", "tasks"]
        self.environment = environment or {}
        self.s3_conn_id = s3_conn_id
        self._process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [sys.executable, *self.command_prefix, self.stage, *self.arguments,
                *self.extra_arguments]

    def execute(self, context):
        from clear_runtime.settings import s3_environment

        command = self.command()
        self.log.info("running %s", " ".join(command))
        environment = {**os.environ, **self.environment, **s3_environment(self.s3_conn_id)}
        tail: deque[str] = deque(maxlen=20)
        with tempfile.TemporaryFile(mode="w+") as stdout:
            self._process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE,
                                             text=True, env=environment,
                                             start_new_session=True)
            for line in self._process.stderr:
                line = line.rstrip("\n")
                tail.append(line)
                self.log.info("%s", line)
            returncode = self._process.wait()
            stdout.seek(0)
            output = stdout.read()
        if returncode != 0:
            raise stage_failure(self.stage, returncode, tail[-1] if tail else "")
        return parse_summary(output)

    def on_kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
