"""dashboard.js's websocket follower under node, with the browser objects it touches stubbed:
which close codes it resumes after (with ?after=<last seq>) and which it takes as a refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "portal/static/sluice/dashboard.js"

HARNESS = """
const opened = [];
global.location = {protocol: "http:", host: "sluice.test"};
global.document = {addEventListener() {}};
global.window = {};
global.setTimeout = (callback) => callback();
global.WebSocket = function (url) { opened.push(url); this.url = url; opened.last = this; };
require(process.argv[1]);
const panel = {dataset: {eventsUrl: "/ws/jobs/job_1/", status: "running"}, querySelector() { return null; }};
window.sluice.followJob(panel);
opened.last.onmessage({data: JSON.stringify({seq: 3, type: "job.progress", data: {}})});
opened.last.onclose({code: Number(process.argv[2])});
process.stdout.write(JSON.stringify(opened));
"""


@pytest.mark.parametrize(("code", "reconnects"), [
    (1006, True), (1011, True), (4503, True),  # a dropped connection, a server error, Redis
    (4401, False), (4403, False), (4404, False),  # refusals: retrying cannot help
])
def test_a_followed_job_resumes_after_the_last_event_unless_refused(code, reconnects):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    run = subprocess.run([node, "-e", HARNESS, str(SCRIPT), str(code)], capture_output=True,
                         text=True, timeout=30, check=True)
    opened = json.loads(run.stdout)
    first = "ws://sluice.test/ws/jobs/job_1/?after=0"
    assert opened == ([first, "ws://sluice.test/ws/jobs/job_1/?after=3"] if reconnects else [first])
