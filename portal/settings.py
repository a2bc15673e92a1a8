"""Django settings for Sluice. Every value comes from the environment through portal.env.

Tier limits and budgets are data (portal.Tier rows), not settings.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from portal.env import (
    env_bool,
    env_choice,
    env_cpus,
    env_database,
    env_dict_int,
    env_dict_str,
    env_float,
    env_float_list,
    env_int,
    env_list,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("SLUICE_VAR_DIR", str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

DEBUG = env_bool("SLUICE_DEBUG", False)


def _secret_key() -> str:
    configured = env_str("SLUICE_SECRET_KEY", "")
    if configured:
        return configured
    # One machine, no configuration: keep a random key beside the SQLite file so sessions and
    # key digests survive restarts. Deployments set SLUICE_SECRET_KEY.
    key_file = VAR_DIR / "secret_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
# API key digests are keyed separately so rotating SECRET_KEY (sessions, CSRF) keeps keys valid.
API_KEY_HASH_SECRET = env_str("SLUICE_API_KEY_HASH_SECRET", SECRET_KEY)

ALLOWED_HOSTS = env_list("SLUICE_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("SLUICE_CSRF_TRUSTED_ORIGINS", [])
SESSION_COOKIE_SECURE = env_bool("SLUICE_SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "portal",
    "quotas",
    "inference",
    "moderation",
]

MIDDLEWARE = [
    "portal.middleware.RequestIdMiddleware",
    "quotas.middleware.RateLimitHeadersMiddleware",
    # Django's own, run inline in the async chain where they do no I/O (portal/middleware.py).
    "portal.middleware.SecurityMiddleware",
    "portal.middleware.StaticFilesMiddleware",  # WhiteNoise, async-capable
    "portal.middleware.SessionMiddleware",
    "portal.middleware.CommonMiddleware",
    "portal.middleware.CsrfViewMiddleware",
    "portal.middleware.AuthenticationMiddleware",
    "portal.middleware.MessageMiddleware",
    "portal.middleware.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "portal.urls"
ASGI_APPLICATION = "portal.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.views.tenant_context",
            ],
        },
    },
]

DATABASES = {
    "default": env_database("DATABASE_URL", f"sqlite:///{VAR_DIR / 'sluice.sqlite3'}"),
}
# Persistent connections are for workers (the launcher sets 60 s there: a PostgreSQL connect
# costs milliseconds per task otherwise). The ASGI server keeps 0: its sync views run in many
# executor threads, each of which would hold a connection until PostgreSQL runs out.
DATABASES["default"].setdefault("CONN_MAX_AGE", env_int("SLUICE_DB_CONN_MAX_AGE", 0, minimum=0))
DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
# The ASGI server (make run sets this for it): a bounded pool of PostgreSQL connections
# (Django's, on psycopg_pool) instead of a connect per request, whose server-side backend start
# cost more CPU than the request's own queries. Bounded, so its executor threads cannot run
# PostgreSQL out of clients. Workers keep persistent connections instead (a pool and
# CONN_MAX_AGE exclude each other).
DB_POOL_MAX = env_int("SLUICE_DB_POOL_MAX", 0, minimum=0)
if (DB_POOL_MAX and DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
        and DATABASES["default"]["CONN_MAX_AGE"] == 0):
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1, "max_size": DB_POOL_MAX, "timeout": 10}
# PostgreSQL binds parameters itself and psycopg prepares the statements a connection runs
# repeatedly (the job spine runs the same dozen for every job): PostgreSQL then skips parsing
# and planning them, about half its CPU per job in bench-jobs. Turn off where a pooler in
# transaction mode sits in between (PgBouncer before 1.21 loses prepared statements).
if (env_bool("SLUICE_DB_PREPARED_STATEMENTS", True)
        and DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"):
    DATABASES["default"].setdefault("OPTIONS", {}).update(server_side_binding=True,
                                                          prepare_threshold=5)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web server and the workers read while one of them writes.
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"].setdefault(
        "init_command", "PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000;"
    )
    DATABASES["default"]["OPTIONS"].setdefault("transaction_mode", "IMMEDIATE")
    # A file, not memory, so tests that fork worker processes share the test database.
    DATABASES["default"].setdefault("TEST", {"NAME": str(VAR_DIR / "test-sluice.sqlite3")})
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard-home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
# Serve straight from the finders so a fresh clone needs no collectstatic step.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG
MEDIA_ROOT = Path(env_str("SLUICE_MEDIA_ROOT", str(VAR_DIR / "media")))

# Invitations carry one-time set-password links: in production they go out by SMTP, never to
# the console (a log line that holds one would hand over the account).
EMAIL_BACKEND = env_str(
    "SLUICE_EMAIL_BACKEND",
    "django.core.mail.backends.console.EmailBackend" if DEBUG
    else "django.core.mail.backends.smtp.EmailBackend",
)
EMAIL_HOST = env_str("SLUICE_EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("SLUICE_EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = env_str("SLUICE_EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("SLUICE_EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("SLUICE_EMAIL_USE_TLS", False)
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = env_str("SLUICE_DEFAULT_FROM_EMAIL", "sluice@localhost")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["portal.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["portal.parsers.JsonObjectParser"],
    "EXCEPTION_HANDLER": "portal.errors.api_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Sluice API",
    "DESCRIPTION": "OpenAI-compatible API for metered code and video generation.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Redoc from drf-spectacular-sidecar's static files, not a CDN: the API docs load offline.
    "REDOC_DIST": "SIDECAR",
}

# Celery: the broker is the same Redis. Long GPU work and short work never share a queue;
# SLUICE_WORKER_QUEUES lists the queues `make run` starts one worker for.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ALWAYS_EAGER = False
SLUICE_WORKER_QUEUES = env_list("SLUICE_WORKER_QUEUES", ["default", "webhooks", "video-hbm", "text-batch"])

# Options for asyncio Redis connections that sit in blocking reads (the channel layer's
# BZPOPMIN, the event followers' XREAD). No client-side read timeout: with one, redis-py 8's
# asyncio.timeout on Python 3.11 sometimes swallows a task's cancellation, and the cancelled
# reader blocks again for ever (a websocket consumer that never finishes disconnecting; seen
# as a hung test teardown). The server bounds every blocking read (5 s / 15 s), and TCP
# keepalive notices a peer that vanished.
REDIS_ASYNC_BLOCKING_OPTIONS = {
    "socket_timeout": None,
    "socket_connect_timeout": 5,
    "socket_keepalive": True,
    "socket_keepalive_options": {socket.TCP_KEEPIDLE: 30, socket.TCP_KEEPINTVL: 10, socket.TCP_KEEPCNT: 3},
}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [{"address": REDIS_URL, **REDIS_ASYNC_BLOCKING_OPTIONS}], "prefix": "sluice:ch"},
    }
}

# API keys: how often last_used_at may be written (a write per request would be a hot row).
API_KEY_LAST_USED_RESOLUTION_S = env_int("SLUICE_API_KEY_LAST_USED_RESOLUTION_S", 60, minimum=0)
# /readyz gives each dependency this long to answer.
READINESS_TIMEOUT_S = env_float("SLUICE_READINESS_TIMEOUT_S", 1.0, minimum=0.05)

# Any case (`debug` read as DEBUG); another word stops start-up naming the variable, not
# logging's "Unable to configure root logger".
LOG_LEVEL = env_choice("SLUICE_LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical")).upper()
# One JSON object per line for log collectors; `make run` sets "plain" for people reading a terminal.
LOG_FORMAT = env_choice("SLUICE_LOG_FORMAT", "json", ("json", "plain"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # Stamps request, tenant, job and pool ids (portal/logs.py) on every record.
    "filters": {"log_context": {"()": "portal.logs.LogContextFilter"}},
    "formatters": {
        "plain": {
            "()": "portal.logs.PlainLogFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s [%(log_context)s] %(message)s",
        },
        "json": {"()": "portal.logs.JsonLogFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["log_context"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Django's default config gives "django" its own console handler; one handler is enough.
        "django": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django.db.backends": {"level": "WARNING"},
        # httpx logs every request URL at INFO; webhook URLs are customers' and may carry tokens.
        "httpx": {"level": "WARNING"},
        # Celery's "Task ... received" / "... succeeded" lines: two per job, about 6% of a busy
        # worker's consumer CPU; the job services log what matters and metrics count the rest.
        "celery.worker.strategy": {"level": "WARNING"},
        "celery.app.trace": {"level": "WARNING"},
        # "Sending due task ..." for every beat tick (the scheduler's every 2 s): about a line a
        # second that says nothing, and make run's printed credentials scrolled away in seconds.
        "celery.beat": {"level": "WARNING"},
        # uvicorn gives its loggers a plain-text handler of its own before the project loads:
        # its lines (start-up, shutdown, websocket handshakes, "Exception in ASGI application"
        # and its traceback) go through ours instead, as JSON and redacted. No level: uvicorn's
        # --log-level keeps deciding it. Only this leaf: configuring "uvicorn" would reset its
        # children, and uvicorn.access logs every request once it has a handler (undoing
        # --no-access-log).
        "uvicorn.error": {"handlers": ["console"], "propagate": False},
    },
}

# Prometheus metrics (portal/metrics.py; docs/operations.md "Metrics"). With a token set, a
# scrape must send `Authorization: Bearer <token>`; without one only loopback clients may scrape.
SLUICE_METRICS_TOKEN = env_str("SLUICE_METRICS_TOKEN", "")
# A Celery worker serves its pod's metrics on this port (0: off; `make run`'s web server
# aggregates every local process through PROMETHEUS_MULTIPROC_DIR instead).
SLUICE_METRICS_PORT = env_int("SLUICE_METRICS_PORT", 0, minimum=0)
# Probe each text variant's vLLM /health at scrape time. Off where the engines are not
# reachable from the scraped process (the web pods of a cluster: engines are text-pod sidecars).
SLUICE_METRICS_PROBE_ENGINES = env_bool("SLUICE_METRICS_PROBE_ENGINES", True)

# Never load weights from a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Model checkpoints (folders written by save_pretrained). The tiny models ship in the repo.
SLUICE_CODE_MODEL_PATH = env_str(
    "SLUICE_CODE_MODEL_PATH", str(BASE_DIR / "inference" / "artifacts" / "sluice-code-tiny")
)
SLUICE_VIDEO_MODEL_PATH = env_str(
    "SLUICE_VIDEO_MODEL_PATH", str(BASE_DIR / "inference" / "artifacts" / "sluice-video-tiny")
)

# GPU pools: capacity of each pool's weighted semaphore (CU in flight at once) and how long an
# admitted reservation may hold it before it counts as orphaned (its worker died).
SLUICE_POOL_CAPACITY_CU = env_dict_int("SLUICE_POOL_CAPACITY_CU", {"text-batch": 200, "video-hbm": 2000})
SLUICE_POOL_LEASE_S = env_dict_int("SLUICE_POOL_LEASE_S", {"text-batch": 300, "video-hbm": 3600})
# Jobs each pool runs at once (its workers' slots); queued work waits in the scheduler beyond.
SLUICE_POOL_SLOTS = env_dict_int("SLUICE_POOL_SLOTS", {"text-batch": 32, "video-hbm": 1})
# The longest one attempt of a job may run (seconds, per pool; other pools 3600): past it the
# worker stops it and it fails with `job_timeout`, charged for what it produced. Its heartbeat
# is what renews its lease, so without a limit a hung engine held its slot for ever.
SLUICE_JOB_MAX_RUN_S = env_dict_int("SLUICE_JOB_MAX_RUN_S", {"text-batch": 900, "video-hbm": 3600})
# `make run`'s first Ctrl-C / SIGTERM lets the workers finish their running jobs (Celery's warm
# shutdown) for at most this long, then stops everything as a second one does (0: at once).
# The longest pool limit by default: by then every job has ended or been stopped for it.
SLUICE_STOP_DRAIN_S = env_int("SLUICE_STOP_DRAIN_S", max(SLUICE_JOB_MAX_RUN_S.values(), default=3600),
                              minimum=0)
SLUICE_POOL_RETRY_AFTER_S = env_int("SLUICE_POOL_RETRY_AFTER_S", 2, minimum=1)
# The scheduler's reconciliation (beat, every 30 s): a queued job older than this that is in no
# scheduler queue (Redis lost it, or a step after its commit failed) is queued again; an
# admitted one no worker claimed this long after its admission is sent to its pool again.
SLUICE_SCHEDULER_RECONCILE_AFTER_S = env_int("SLUICE_SCHEDULER_RECONCILE_AFTER_S", 30, minimum=1)
SLUICE_JOB_RESEND_AFTER_S = env_int("SLUICE_JOB_RESEND_AFTER_S", 60, minimum=1)
# Budget alert thresholds, percent of the period's budget (dashboard banner, webhook event).
SLUICE_BUDGET_ALERT_PCT = env_int("SLUICE_BUDGET_ALERT_PCT", 80, minimum=1)

# Webhooks (inference/webhooks.py). Delivery is short work on its own `webhooks` queue.
SLUICE_WEBHOOK_TIMEOUT_S = env_float("SLUICE_WEBHOOK_TIMEOUT_S", 10.0, minimum=0.01)
# Seconds before retry 1, 2, ...: Svix's schedule, about a day in all. Each delay gets +-jitter.
SLUICE_WEBHOOK_RETRY_SCHEDULE_S = env_float_list(
    "SLUICE_WEBHOOK_RETRY_SCHEDULE_S", [5, 300, 1800, 7200, 18000, 36000, 50400], minimum=0
)
SLUICE_WEBHOOK_RETRY_JITTER = env_float("SLUICE_WEBHOOK_RETRY_JITTER", 0.2, minimum=0)
# Deliveries in a row that give up before the endpoint is disabled (0: never).
SLUICE_WEBHOOK_DISABLE_AFTER_FAILURES = env_int(
    "SLUICE_WEBHOOK_DISABLE_AFTER_FAILURES", 5, minimum=0
)
# Development only: deliver to loopback/private/link-local addresses.
SLUICE_WEBHOOK_ALLOW_PRIVATE = env_bool("SLUICE_WEBHOOK_ALLOW_PRIVATE", False)
# Exact `host:port` pairs exempt from the address check (an internal receiver you trust).
SLUICE_WEBHOOK_ALLOWED_HOSTS = env_list("SLUICE_WEBHOOK_ALLOWED_HOSTS", [])
SLUICE_WEBHOOK_MAX_REDIRECTS = env_int("SLUICE_WEBHOOK_MAX_REDIRECTS", 3, minimum=0)
# Deliveries in flight at once to one endpoint: a slow receiver holds this many webhook
# workers at most, the rest wait their turn (not counted as attempts) and the others' go on.
SLUICE_WEBHOOK_ENDPOINT_MAX_IN_FLIGHT = env_int("SLUICE_WEBHOOK_ENDPOINT_MAX_IN_FLIGHT", 4, minimum=1)
SLUICE_WEBHOOK_RESPONSE_MAX_BYTES = env_int("SLUICE_WEBHOOK_RESPONSE_MAX_BYTES", 1024, minimum=0)
# After a rotation the old secret keeps signing (a second signature) for this long.
SLUICE_WEBHOOK_SECRET_OVERLAP_S = env_int("SLUICE_WEBHOOK_SECRET_OVERLAP_S", 86400, minimum=0)
# How often the sweeper hands due retries to the webhooks queue.
SLUICE_WEBHOOK_SWEEP_S = env_float("SLUICE_WEBHOOK_SWEEP_S", 5.0, minimum=0.1)
# Events, deliveries and attempt logs are kept this long once their deliveries are over.
SLUICE_WEBHOOK_RETENTION_DAYS = env_int("SLUICE_WEBHOOK_RETENTION_DAYS", 30, minimum=1)
# job.progress webhooks (opt-in) go out at most once per this many seconds per job: a video
# has hundreds of steps, and a receiver wants a heartbeat, not a firehose.
SLUICE_WEBHOOK_PROGRESS_INTERVAL_S = env_float("SLUICE_WEBHOOK_PROGRESS_INTERVAL_S", 5.0, minimum=0.05)

CELERY_BEAT_SCHEDULE = {
    "reservations-expire": {"task": "quotas.reservations_expire", "schedule": 30.0},
    "reservations-sync": {"task": "quotas.reservations_sync", "schedule": 10.0},
    "webhook-deliveries-dispatch": {
        "task": "inference.webhook_deliveries_dispatch",
        "schedule": SLUICE_WEBHOOK_SWEEP_S,
        "options": {"queue": "webhooks"},
    },
}

# Jobs: a worker refreshes its job's heartbeat every few seconds; a running job whose
# heartbeat is older than this is treated as lost and redelivered, up to the attempts cap.
SLUICE_JOB_HEARTBEAT_TTL_S = env_int("SLUICE_JOB_HEARTBEAT_TTL_S", 15, minimum=2)
SLUICE_JOB_MAX_ATTEMPTS = env_int("SLUICE_JOB_MAX_ATTEMPTS", 3, minimum=1)
# Video: a small JPEG preview (job.preview event) every this many denoising steps; 0 = none.
SLUICE_VIDEO_PREVIEW_EVERY = env_int("SLUICE_VIDEO_PREVIEW_EVERY", 5, minimum=0)
# A job's outputs (a video's mp4 and thumbnail, a completion's text) and the prompt it was sent
# are removed this many days after it ended (hourly); the row, its usage and CU stay. 0: kept.
SLUICE_MEDIA_RETENTION_DAYS = env_int("SLUICE_MEDIA_RETENTION_DAYS", 30, minimum=0)
CELERY_BEAT_SCHEDULE.update({
    # `expires`: a tick still queued when the next is due is dropped, not run late beside it.
    "jobs-reap": {"task": "inference.jobs_reap", "schedule": 5.0, "options": {"expires": 5.0}},
    "scheduler-tick": {"task": "inference.scheduler_tick", "schedule": 2.0,
                       "options": {"expires": 2.0}},
    "scheduler-reconcile": {"task": "inference.scheduler_reconcile", "schedule": 30.0},
    "jobs-content-expire": {"task": "inference.jobs_content_expire", "schedule": 3600.0},
    "idempotency-purge": {"task": "inference.idempotency_purge", "schedule": 3600.0},
    # Moderation cases keep their prompt SLUICE_MODERATION_PROMPT_RETENTION_DAYS, no longer.
    "moderation-prompts-purge": {"task": "moderation.case_prompts_purge", "schedule": 3600.0},
    "webhook-records-purge": {"task": "inference.webhook_records_purge", "schedule": 3600.0},
})

# Text engines: the OpenAI-compatible vLLM server serving each text variant (by served name).
# `make run` starts a local server for every loopback URL here that does not answer yet.
SLUICE_VLLM_URLS = env_dict_str(
    "SLUICE_VLLM_URLS",
    {"sluice-code-tiny": "http://127.0.0.1:8101", "sluice-code-tiny-int8": "http://127.0.0.1:8102"},
)
SLUICE_VLLM_START = env_bool("SLUICE_VLLM_START", True)
# The CPUs `make run` pins each engine it started to, once the engine has loaded. vLLM's CPU
# engine busy-polls: left on every core of a small machine it starves the web server, the
# workers and Redis. `auto`: every CPU but the last on a machine without a GPU that has two or
# more (the last left to the rest), else no pinning; `none`; or a CPU list such as `0-2`.
SLUICE_ENGINE_CPUS = env_cpus("SLUICE_ENGINE_CPUS", "auto")
# Seconds a text job waits for its engine to come up (a server still loading) before failing.
SLUICE_VLLM_READY_TIMEOUT_S = env_int("SLUICE_VLLM_READY_TIMEOUT_S", 180, minimum=1)
# The longest an engine may stay silent on a stream (before its first token too: a request
# waiting in vLLM's queue). A hung engine then fails its jobs (refunded) instead of holding
# their pool slots while their workers, still heartbeating, keep the leases renewed.
SLUICE_VLLM_READ_TIMEOUT_S = env_float("SLUICE_VLLM_READ_TIMEOUT_S", 300.0, minimum=0.1)
SLUICE_CODE_MODEL_INT8_PATH = env_str(
    "SLUICE_CODE_MODEL_INT8_PATH", str(BASE_DIR / "inference" / "artifacts" / "sluice-code-tiny-int8")
)
# The code model's context length (prompt + completion tokens) is its checkpoints' own, as vLLM
# derives it from config.json (the smaller of the two variants'); a value > 0 lowers it, e.g.
# when an engine's KV cache cannot hold the full context. Admission and --max-model-len use it.
SLUICE_CODE_MAX_MODEL_LEN = env_int("SLUICE_CODE_MAX_MODEL_LEN", 0, minimum=0)
# Celery execution pool per queue: text workers stream from a shared engine, many at a time.
SLUICE_WORKER_POOLS = env_dict_str("SLUICE_WORKER_POOLS", {"text-batch": "threads"})

# Safety cascade and moderation (moderation/; README "Safety").
SLUICE_SAFETY_ARTIFACT_DIR = Path(
    env_str("SLUICE_SAFETY_ARTIFACT_DIR", str(BASE_DIR / "moderation" / "artifacts"))
)
# How long a process keeps its compiled SafetyRule set before re-reading the table.
SLUICE_SAFETY_RULES_TTL_S = env_float("SLUICE_SAFETY_RULES_TTL_S", 30.0, minimum=0)
# How long a process keeps a tenant's resolved SafetyPolicy (edits made here apply at once).
SLUICE_SAFETY_POLICY_TTL_S = env_float("SLUICE_SAFETY_POLICY_TTL_S", 5.0, minimum=0)
# Intra-op threads for the safety encoder; 1 keeps a request from contending with its neighbours.
SLUICE_SAFETY_TORCH_THREADS = env_int("SLUICE_SAFETY_TORCH_THREADS", 1, minimum=1)
# Windows of 254 word pieces the classifier reads of one text, its head included: one encoder
# pass each (moderation.classifier.window_spans). 16 read whole a text of up to about 3,500 word
# pieces: the code model's whole context (1,024 tokens) at 3.4 word pieces a token, where the
# densest prompt of the safety corpus has 3.25 and English and code about 0.7. A longer text is
# sampled: 16 windows spread evenly over it. At least 2, the head and the end.
SLUICE_SAFETY_MAX_WINDOWS = env_int("SLUICE_SAFETY_MAX_WINDOWS", 16, minimum=2)
SLUICE_MODERATION_PROMPT_RETENTION_DAYS = env_int(
    "SLUICE_MODERATION_PROMPT_RETENTION_DAYS", 30, minimum=0
)
# Characters a tenant may screen through /v1/moderations a minute (free of CU, but each one is
# classifier CPU on the web tier); a request may hold at most this many.
SLUICE_MODERATIONS_CHARS_PER_MINUTE = env_int("SLUICE_MODERATIONS_CHARS_PER_MINUTE", 400_000,
                                              minimum=1)
SLUICE_MODERATION_STRIKES_TO_SUSPEND = env_int("SLUICE_MODERATION_STRIKES_TO_SUSPEND", 3, minimum=1)
SLUICE_MODERATION_STRIKE_WINDOW_HOURS = env_int(
    "SLUICE_MODERATION_STRIKE_WINDOW_HOURS", 168, minimum=1
)
