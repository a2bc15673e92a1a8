"""OpenAI-compatible /v1/chat/completions and /v1/completions.

Every generation is a job on the text pool (admission, tier priority, settlement), yet a
synchronous request feels direct: this view follows the job's Redis stream and relays each
chunk as it lands, in OpenAI's chunk format. A client that disconnects mid-stream, or before
a non-streaming answer, cancels the job: the worker aborts the engine request and settles the
tokens actually produced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

from django.core.exceptions import RequestDataTooBig
from django.db import close_old_connections
from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from inference.errors import StreamInterrupted
from inference.events import events_follow
from inference.models import Job
from inference.requests import TextRequest, message_text, text_request_parse
from inference.services import job_cancel, text_job_submit
from moderation.cascade import safety_check_input
from moderation.rules import rules_active
from moderation.selectors import safety_policy_for_tenant
from moderation.services import safety_verdict_enforce
from portal.authentication import ApiPrincipal, bearer_token, method_not_allowed
from portal.db import database_step
from portal.errors import (
    InvalidApiKey,
    InvalidParameter,
    SluiceError,
    json_error,
    to_sluice_error,
)
from portal.parsers import json_object_require
from portal.services import api_key_authenticate

if TYPE_CHECKING:
    from inference.registry import ModelVariant
    from moderation.cascade import SafetyVerdict
    from quotas.cost import CostEstimate

logger = logging.getLogger(__name__)

# A relay waits this long for an event before a keep-alive (and, streaming, a look at the row).
RELAY_IDLE_MS = 60_000


class EngineFailed(SluiceError):
    code = "engine_error"
    http_status = 502
    default_message = "The model failed to generate a response. You were not charged for it."


class JobFailed(EngineFailed):
    """A failed job's own error (`engine_error`, `worker_lost`, `queue_timeout`...) and message."""

    def __init__(self, *, code: str, message: str) -> None:
        code = code or EngineFailed.code
        # An engine's own error text names internal hosts and ports: callers get the plain one.
        super().__init__(None if code == EngineFailed.code else message or None)
        self.code = code


class RetryDiverged(SluiceError):
    code = "worker_lost"
    http_status = 502
    default_message = ("The worker generating this stream was lost, and the retry produced "
                       "different text from what was already sent. The stream ends here; "
                       "only the retry's tokens are charged.")


class _RetryRelay:
    """What of a job's output the client has not been sent yet.

    A worker lost mid-stream is replaced by a new attempt (the reaper redelivers the job:
    `job.queued` with reason `worker_lost`) that generates from the start again, while the
    client already holds the lost attempt's text. The new attempt's text is held back until it
    has passed what was sent, and only the rest goes out. Greedy decoding (temperature 0) or a
    seed gives the same text again. Where sampling does not, `diverged` is set: the client's
    text cannot be continued."""

    def __init__(self) -> None:
        self.sent = ""
        self.replayed: str | None = None  # the new attempt's text while it is behind `sent`
        self.diverged = False

    def restart(self) -> None:
        if self.sent:
            self.replayed = ""

    def delta(self, text: str) -> str:
        if self.replayed is None:
            self.sent += text
            return text
        self.replayed += text
        if len(self.replayed) <= len(self.sent):
            self.diverged = not self.sent.startswith(self.replayed)
            return ""
        if not self.replayed.startswith(self.sent):
            self.diverged = True
            return ""
        new, self.sent, self.replayed = self.replayed[len(self.sent):], self.replayed, None
        return new

    def ended_behind(self) -> bool:
        """At the end: the new attempt stopped short of what the lost one had sent."""
        return self.replayed is not None and self.replayed != self.sent


class _Submitted(NamedTuple):
    text: TextRequest
    variant: ModelVariant
    estimate: CostEstimate
    job: Job
    verdict: SafetyVerdict


def _submit(request, *, chat: bool) -> _Submitted:
    """Authenticate, validate, price and admit: everything before the first token."""
    token = bearer_token(request.headers.get("Authorization", ""))
    if token is None:
        raise InvalidApiKey("You didn't provide an API key. Send it as 'Authorization: Bearer sk-...'.")
    api_key = api_key_authenticate(raw_key=token)
    request.user = ApiPrincipal(api_key=api_key)  # for the rate-limit headers
    try:
        payload = json_object_require(json.loads(request.body or b"{}"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidParameter(f"The body is not valid JSON: {exc}") from exc
    except RequestDataTooBig as exc:  # Django's HTML 400 page otherwise
        raise to_sluice_error(exc) from exc
    tier = api_key.tenant.tier
    policy = safety_policy_for_tenant(tenant=api_key.tenant)
    endpoint = "chat.completions" if chat else "completions"
    idempotency_key = request.headers.get("Idempotency-Key")
    prompt = screened_text(payload)

    def enforce(screened) -> SafetyVerdict:
        return safety_verdict_enforce(tenant=api_key.tenant, api_key=api_key, verdict=screened,
                                      text=prompt, endpoint=endpoint,
                                      request_id=getattr(request, "request_id", ""),
                                      idempotency_key=idempotency_key)

    # The classifier runs beside tokenisation and pricing: it adds max(), not sum(). Its thread
    # only classifies: the policy and rules are read here and the verdict's case is written
    # here, so it never holds one of the pool's database connections.
    screening = None if prompt is None else _SAFETY_POOL.submit(
        safety_check_input, text=prompt, policy=policy, rules=rules_active())
    try:
        text = text_request_parse(payload=payload, tier=tier, chat=chat)
    finally:
        # A blocked prompt is refused (and its case opened) even when its parameters are bad too.
        verdict = enforce(screening.result()) if screening is not None else None
    if verdict is None:  # token ids: screened as the text they decode to
        prompt = text.prompt_text
        verdict = enforce(safety_check_input(text=prompt, policy=policy, rules=rules_active()))
    submission, variant, estimate = text_job_submit(
        api_key=api_key, text=text, safety_policy=policy, mode="sync",
        idempotency_key=idempotency_key, request_body=payload,
    )
    request.rate_headroom = submission.rate  # the rate-limit headers, without a second read
    return _Submitted(text, variant, estimate, submission.job, verdict)


_SAFETY_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="safety")


def screened_text(payload: dict) -> str | None:
    """What the input cascade reads: every message's content, or the prompt (alone or as a
    batch of one). None: token ids, whose text is known only once the request is parsed."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        return "\n".join(message_text(m.get("content")) for m in messages if isinstance(m, dict))
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    return None if isinstance(prompt, list) else ""


def _cancel_after_disconnect(job_id: str) -> None:
    try:
        job = Job.objects.get(pk=job_id)
        if not job.is_terminal:
            job_cancel(job=job)
            logger.info("client left before the end of %s: cancelled", job_id)
    except Exception:
        logger.exception("could not cancel %s after a disconnect", job_id)
    finally:
        close_old_connections()


def _cancel_in_background(job_id: str) -> None:
    """A thread, because the coroutine that saw the client leave is being torn down."""
    threading.Thread(target=_cancel_after_disconnect, args=(job_id,), daemon=True).start()


class _Shape:
    """OpenAI's response and chunk shapes for one job."""

    def __init__(self, *, chat: bool, job: Job, served_name: str, include_usage: bool = False):
        self.chat = chat
        # With stream_options.include_usage, OpenAI's chunks all carry `usage`, null but on
        # the last one: clients that read it from every chunk find the key.
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{job.pk.removeprefix('job_')}"
        self.created = int(job.queued_at.timestamp())
        self.model = served_name
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, *, delta: str | None = None, role: bool = False, finish_reason: str | None = None,
              partial: dict | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
            if role:
                choice["delta"] = {"role": "assistant", "content": ""}
            elif delta is not None:
                choice["delta"] = {"content": delta}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
        if finish_reason is not None and partial is not None:
            choice["partial_completion"] = partial
        chunk = {**self._envelope("chat.completion.chunk" if self.chat else "text_completion"),
                 "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": [], "usage": _usage(usage)}

    def full(self, *, text: str, finish_reason: str, usage: dict, partial: dict | None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if partial is not None:
            choice["partial_completion"] = partial
        return {**self._envelope(self.object), "choices": [choice], "usage": _usage(usage)}


def _usage(usage: dict | None) -> dict:
    """OpenAI's usage always has its three counts (the SDK reads a missing one as None, not 0):
    a job cancelled before it started has none, having used no token."""
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, **(usage or {})}


def _finish_reason(result: dict, *, cancelled: bool) -> str:
    """The engine's reason (`cancelled` for a job stopped while it generated), else how the job
    ended: one cancelled before it started has no result, and did not `stop`."""
    return result.get("finish_reason") or ("cancelled" if cancelled else "stop")


class SourceClosingStream(StreamingHttpResponse):
    """A streaming response that closes its own generator when Django stops consuming it.

    When the client leaves, Django closes the iterator it consumes (`aclosing(aiter(response))`)
    but not the generator wrapped inside it, which then closes - and runs the `finally` that
    cancels the job - only when the garbage collector reaches it: on a busy process late
    enough that the engine had generated all the tokens, for nobody (seen in CI)."""

    def __init__(self, source, **kwargs):
        super().__init__(source, **kwargs)
        self._source = source

    async def __aiter__(self):
        try:
            async for part in super().__aiter__():
                yield part
        finally:
            await self._source.aclose()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _sse_error_end(error: SluiceError) -> str:
    """A stream that cannot finish: its error object as the last chunk, then [DONE]."""
    return _sse(error.body()) + _sse("[DONE]")


# Database work of these long-lived async handlers goes through database_step (Channels'
# database_sync_to_async on shared threads): the connection goes back to the pool when each
# step returns.
@database_step
def _terminal_job(job_id: str) -> Job:
    return Job.objects.get(pk=job_id)


def _cancel_the_job_it_made(submitting: asyncio.Future) -> None:
    if not submitting.cancelled() and submitting.exception() is None:
        _cancel_in_background(submitting.result().job.pk)


async def _generate(request, *, chat: bool):
    # Shielded: a client that leaves while its request is admitted (an SDK timeout while the
    # server is busy) cancels this view, but the admission runs on in its thread and would
    # make a job nobody waits for, generated to its end and billed in full. It finishes, and
    # the job it made is cancelled (refunded, or billed for what it produced).
    submitting = asyncio.ensure_future(database_step(_submit)(request, chat=chat))
    try:
        text, variant, estimate, job, verdict = await asyncio.shield(submitting)
    except SluiceError as error:
        return json_error(error)
    except asyncio.CancelledError:
        submitting.add_done_callback(_cancel_the_job_it_made)
        raise
    shape = _Shape(chat=chat, job=job, served_name=variant.served_name,
                   include_usage=text.stream and text.include_usage)
    headers = {"x-cu-estimate": str(estimate.cu), "x-sluice-job-id": job.pk,
               "x-safety-latency-ms": f"{verdict.timings_ms.get('total', 0):.1f}"}
    if text.stream:
        response = SourceClosingStream(_stream(job, shape, text), content_type="text/event-stream",
                                       headers=headers)
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response
    pieces: list[str] = []
    try:
        async for event in events_follow(job_id=job.pk, block_ms=RELAY_IDLE_MS,
                                         is_finished=lambda: _job_is_over(job.pk)):
            if event is not None and event.type == "job.output":
                pieces.append(event.data["delta"])
    except StreamInterrupted as error:
        _cancel_in_background(job.pk)  # nobody can be given its answer: stop paying for it
        return json_error(error)
    except asyncio.CancelledError:
        # The client left before its answer (a timeout, a closed connection: Django cancels
        # the view): as for a stream, stop the generation and bill what was produced.
        _cancel_in_background(job.pk)
        raise
    job = await _terminal_job(job.pk)
    if job.status == Job.Status.FAILED:
        return json_error(JobFailed(code=job.error_code, message=job.error_message))
    result = job.result or {}
    body = shape.full(text=result.get("text", "".join(pieces)),
                      finish_reason=_finish_reason(result, cancelled=job.status == Job.Status.CANCELLED),
                      usage=job.usage, partial=result.get("partial"))
    return JsonResponse(body, headers=headers)


@database_step
def _job_is_over(job_id: str) -> bool:
    """Asked by a relay after RELAY_IDLE_MS without events: a job whose end was committed but
    whose last event never reached Redis (it failed just then) still ends its relay, from its row."""
    return Job.objects.filter(pk=job_id).values_list("status", flat=True).first() in Job.TERMINAL


def _stream_tail(shape: _Shape, text: TextRequest, *, result: dict, usage: dict,
                 cancelled: bool) -> str:
    """The last chunks and [DONE], in one write, not three."""
    tail = _sse(shape.chunk(finish_reason=_finish_reason(result, cancelled=cancelled),
                            partial=result.get("partial")))
    if text.include_usage:
        tail += _sse(shape.usage_chunk(usage))
    return tail + _sse("[DONE]")


async def _stream(job: Job, shape: _Shape, text: TextRequest):
    finished = False
    relay = _RetryRelay()

    try:
        if shape.chat:
            yield _sse(shape.chunk(role=True))
        async for event in events_follow(job_id=job.pk, block_ms=RELAY_IDLE_MS,
                                         is_finished=lambda: _job_is_over(job.pk)):
            if event is None:
                yield ": keep-alive\n\n"
            elif event.type == "job.output":
                delta = relay.delta(event.data["delta"])
                if relay.diverged:
                    # Not `finished`: the retry is cancelled (billed for what it produced).
                    yield _sse_error_end(RetryDiverged())
                    return
                if delta:
                    yield _sse(shape.chunk(delta=delta))
            elif event.type == "job.queued" and event.data.get("reason") == "worker_lost":
                relay.restart()
            elif event.type in ("job.completed", "job.cancelled") and relay.ended_behind():
                finished = True
                yield _sse_error_end(RetryDiverged())
                return
            elif event.type in ("job.completed", "job.cancelled"):
                # A completion's event carries its result and usage; a cancel's only its usage,
                # so its result (the partial completion) comes from the row.
                if "result" in event.data:
                    result, usage = event.data["result"] or {}, event.data.get("usage") or {}
                else:
                    final = await _terminal_job(job.pk)
                    result, usage = final.result or {}, final.usage
                finished = True
                yield _stream_tail(shape, text, result=result, usage=usage,
                                   cancelled=event.type == "job.cancelled")
                return
            elif event.type == "job.failed":
                finished = True
                error = event.data.get("error") or {}
                failed = JobFailed(code=error.get("code", ""), message=error.get("message", ""))
                yield _sse_error_end(failed)
                return
        finished = True
        final = await _terminal_job(job.pk)
        if final.status == Job.Status.FAILED:
            failed = JobFailed(code=final.error_code, message=final.error_message)
            yield _sse_error_end(failed)
        else:
            yield _stream_tail(shape, text, result=final.result or {}, usage=final.usage,
                               cancelled=final.status == Job.Status.CANCELLED)
    except StreamInterrupted as error:
        # Not `finished`: the job is cancelled below and billed for what it produced, instead
        # of running on, billed in full, after a stream that looked complete.
        yield _sse_error_end(error)
    finally:
        if not finished:
            # The client went away (or the server is stopping): stop paying for tokens
            # nobody reads.
            _cancel_in_background(job.pk)


def _text_endpoint(*, chat: bool):
    """One POST-only, CSRF-exempt (bearer keys, not cookies) view per OpenAI endpoint."""

    @csrf_exempt
    async def view(request):
        if request.method != "POST":
            return await database_step(method_not_allowed)(request, allowed="POST")
        return await _generate(request, chat=chat)

    return view


chat_completions = _text_endpoint(chat=True)
completions = _text_endpoint(chat=False)
