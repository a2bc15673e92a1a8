"""Serving stored outputs with HTTP Range support, so a browser <video> can seek."""

from __future__ import annotations

import re
from collections.abc import Iterator

from django.core.files.storage import default_storage
from django.http import FileResponse, HttpResponse, StreamingHttpResponse

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_MEDIA_TYPES = {"video": "video/mp4", "thumbnail": "image/jpeg"}


def job_media_response(request, *, job, variant: str) -> HttpResponse:
    """A finished video job's mp4 or thumbnail, for the API (key) and the dashboard (session).
    The caller has already checked the job belongs to the caller's tenant."""
    from inference.models import Job
    from portal.errors import InvalidParameter, NotFound

    if variant not in _MEDIA_TYPES:
        raise InvalidParameter("variant must be video or thumbnail.", param="variant")
    path = (job.result or {}).get(variant)
    if job.status != Job.Status.SUCCEEDED or not path:
        raise NotFound("The video is not ready.", param="id")
    return ranged_file_response(request, path=path, content_type=_MEDIA_TYPES[variant])


# A range is sent in pieces of this size: a browser's <video> asks for `bytes=0-`, the whole
# file, and it must not be read into the web process's memory first.
RANGE_CHUNK_BYTES = 256 * 1024


def ranged_file_response(request, *, path: str, content_type: str) -> HttpResponse:
    size = default_storage.size(path)
    header = request.headers.get("Range", "").strip()
    # Another unit or several ranges: ignored (RFC 9110 allows it), the whole file is sent.
    match = _RANGE.match(header) if header.startswith("bytes=") and "," not in header else None
    if match is not None and match.group(1) == match.group(2) == "":
        return _unsatisfiable(size)
    if match is None:
        response = FileResponse(default_storage.open(path, "rb"), content_type=content_type)
        response["Accept-Ranges"] = "bytes"
        response["Content-Length"] = str(size)
        return response
    start_text, end_text = match.groups()
    if start_text == "":  # suffix range: the last N bytes
        start, end = max(0, size - int(end_text)), size - 1
    else:
        start = int(start_text)
        end = min(int(end_text), size - 1) if end_text else size - 1
    if start >= size or start > end:
        return _unsatisfiable(size)
    response = StreamingHttpResponse(_file_range(path, start=start, length=end - start + 1),
                                     status=206, content_type=content_type)
    response["Content-Range"] = f"bytes {start}-{end}/{size}"
    response["Accept-Ranges"] = "bytes"
    response["Content-Length"] = str(end - start + 1)
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
