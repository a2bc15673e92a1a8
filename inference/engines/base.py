"""The one interface every engine implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class StopRequested(Exception):
    """Raised inside an engine's step callback when the job was cancelled."""


@dataclass
class RunContext:
    """What an engine may do while it runs a job: report, stream, and check for a stop."""

    job_id: str
    params: dict
    variant: str
    emit_progress: Callable[[float, dict], None]
    emit_output: Callable[[dict], None]
    should_stop: Callable[[], bool]
    # Streamed text passes through it (feed/finish release only checked text; `stopped`
    # after a violation): moderation.cascade.OutputModerator for text jobs.
    output_moderator: object | None = None
    emit_preview: Callable[[dict], None] = lambda data: None  # engines without previews ignore it
    # The engine calls it once the work is underway (a text request sent to the engine), so
    # the job's `job.started` bookkeeping overlaps the engine's first step; the runner calls
    # it anyway before any output and at the end. Idempotent.
    started: Callable[[], None] = lambda: None
    # Which attempt of the job this run is (the row's `attempts`): an engine that stores files
    # names them by it, so an attempt that was superseded while it ran never touches the files
    # of the attempt that replaced it.
    attempt: int = 1


@dataclass
class RunResult:
    actual_mcu: int
    result: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)
    stopped: bool = False  # True when the run ended early on request (cancel)


def text_usage(*, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """A text run's usage as OpenAI's completions report it (the job's `usage`), wherever a run
    is billed: the engine's end of it, and the reaper's end of an attempt whose worker was lost
    (`_lost_attempt_end`: cancelled on request or failed past its time limit, billed for the
    tokens it streamed)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class Engine(Protocol):
    def run(self, context: RunContext) -> RunResult: ...
