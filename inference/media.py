"""Serving stored outputs with HTTP Range support, so a browser <video> can seek."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

from django.core.files.storage import default_storage
from django.http import FileResponse, HttpResponse, StreamingHttpResponse
from django.utils.cache import get_conditional_response
from django.utils.http import http_date

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_MEDIA_TYPES = {"video": "video/mp4", "thumbnail": "image/jpeg"}


def job_media_response(request, *, job, variant: str) -> HttpResponse:
    """A finished video job's mp4 or thumbnail, for the API (key) and the dashboard (session).
    The caller has already checked the job belongs to the caller's tenant."""
    from inference.models import Job
    from inference.retention import RETENTION_DAYS, job_content_expired
    from portal.errors import InvalidParameter, NotFound

    if variant not in _MEDIA_TYPES:
        raise InvalidParameter("variant must be video or thumbnail.", param="variant")
    if job.status == Job.Status.SUCCEEDED and job_content_expired(job):
        days = job.result[RETENTION_DAYS]
        raise NotFound(f"The video expired: its files are kept {days} days after it completes, "
                       "and were removed.", param="id")
    path = (job.result or {}).get(variant)
    if job.status != Job.Status.SUCCEEDED or not path:
        raise NotFound("The video is not ready.", param="id")
    try:
        return ranged_file_response(request, path=path, content_type=_MEDIA_TYPES[variant])
    except FileNotFoundError:  # removed since the row was read (its retention ran out)
        raise NotFound("The video's files are no longer available.", param="id") from None


def video_output_names(*, job_id: str, attempt: int) -> dict[str, str]:
    """Where an attempt of a video job stores its files, by variant. Names of the attempt, not
    only of the job: an attempt the reaper took for lost may run on and store after the attempt
    that replaced it ended, and must not replace (even for a moment) what that one published."""
    return {"video": f"videos/{job_id}-{attempt}.mp4", "thumbnail": f"videos/{job_id}-{attempt}.jpg"}


def job_media_remove(result: dict, *, keep: dict | None = None) -> None:
    """Delete the files a video job's `result` points at (a missing one is no error), except any
    that `keep` (the result a job's row publishes) points at."""
    kept = {(keep or {}).get(variant) for variant in _MEDIA_TYPES}
    for variant in _MEDIA_TYPES:
        if (path := result.get(variant)) and path not in kept:
            default_storage.delete(path)


# A range is sent in pieces of this size: a browser's <video> asks for `bytes=0-`, the whole
# file, and it must not be read into the web process's memory first.
RANGE_CHUNK_BYTES = 256 * 1024
# A stored output never changes under its path (each attempt of a job writes names of its own,
# once, and nothing rewrites them), so a client may keep it this long; `private`: the request
# needs an API key or a session, and no shared cache may hand one tenant's video to another.
CONTENT_MAX_AGE_S = 3600


def ranged_file_response(request, *, path: str, content_type: str) -> HttpResponse:
    size = default_storage.size(path)
    modified = int(default_storage.get_modified_time(path).timestamp())
    validators = {
        "ETag": _etag(path, size=size, modified=modified),
        "Last-Modified": http_date(modified),
        "Cache-Control": f"private, max-age={CONTENT_MAX_AGE_S}",
    }
    conditional = get_conditional_response(request, etag=validators["ETag"], last_modified=modified)
    if conditional is not None:  # 304 to a matching If-None-Match (or 412 to a failed If-Match)
        return _with_headers(conditional, validators)
    byte_range = _requested_range(request, validators=validators)
    if byte_range is None:
        response = FileResponse(default_storage.open(path, "rb"), content_type=content_type)
        response["Content-Length"] = str(size)
        return _with_headers(response, {"Accept-Ranges": "bytes", **validators})
    first, last = byte_range
    if first is None:  # suffix range: the last N bytes
        if last == 0 or size == 0:
            return _unsatisfiable(size)
        start, end = max(0, size - last), size - 1
    else:
        if first >= size:
            return _unsatisfiable(size)
        start, end = first, size - 1 if last is None else min(last, size - 1)
    response = StreamingHttpResponse(_file_range(path, start=start, length=end - start + 1),
                                     status=206, content_type=content_type)
    response["Content-Range"] = f"bytes {start}-{end}/{size}"
    response["Content-Length"] = str(end - start + 1)
    return _with_headers(response, {"Accept-Ranges": "bytes", **validators})


def _etag(path: str, *, size: int, modified: int) -> str:
    # Strong: the bytes under a path are written once (video_output_names; another attempt's
    # video has another path, hence another tag), and If-Range takes strong validators only.
    digest = hashlib.sha256(f"{path}:{size}:{modified}".encode()).hexdigest()[:32]
    return f'"{digest}"'


def _requested_range(request, *, validators: dict) -> tuple[int | None, int | None] | None:
    """(first, last) of a single valid byte range to send, either end None when open; None
    for the whole file. Ignored, as RFC 9110 allows or asks (14.2): another unit, several
    ranges, an invalid range (`bytes=5-3`, `bytes=-`), and any range whose If-Range is not
    the current file's validator (the client's part is of another version)."""
    match = _RANGE.match(request.headers.get("Range", "").strip())
    if match is None:
        return None
    if_range = request.headers.get("If-Range", "").strip()
    if if_range and if_range not in (validators["ETag"], validators["Last-Modified"]):
        return None
    first_text, last_text = match.groups()
    if first_text == last_text == "":
        return None
    first = int(first_text) if first_text else None
    last = int(last_text) if last_text else None
    if first is not None and last is not None and last < first:
        return None
    return first, last


def _with_headers(response: HttpResponse, headers: dict) -> HttpResponse:
    for name, value in headers.items():
        response[name] = value
    return response


def _file_range(path: str, *, start: int, length: int) -> Iterator[bytes]:
    with default_storage.open(path, "rb") as handle:
        handle.seek(start)
        while length > 0:
            piece = handle.read(min(RANGE_CHUNK_BYTES, length))
            if not piece:
                return  # the file shrank under us: the client sees a short body
            length -= len(piece)
            yield piece


def _unsatisfiable(size: int) -> HttpResponse:
    response = HttpResponse(status=416)
    response["Content-Range"] = f"bytes */{size}"
    return response
