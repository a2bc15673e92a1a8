from portal.errors import SluiceError


class IdempotencyConflict(SluiceError):
    code = "idempotency_conflict"
    http_status = 409
    default_message = "This Idempotency-Key was used with a different request body."
    retryable = False


class ModelNotAllowed(SluiceError):
    code = "model_not_allowed"
    http_status = 403
    default_message = "Your tier does not include this model."


class ContextLengthExceeded(SluiceError):
    code = "context_length_exceeded"
    http_status = 400
    default_message = "The prompt and max_tokens exceed the model's context length."


class InvalidPromptContext(SluiceError):
    """Messages the model's chat template refuses (a real checkpoint's template may require
    user/assistant turns to alternate, say), or a chat request to a model without a template."""

    code = "invalid_prompt_context"
    http_status = 400
    default_message = "The messages do not form a conversation this model accepts."


class JobNotCancellable(SluiceError):
    code = "invalid_parameter"
    http_status = 400
    default_message = "The job has already finished."


class StreamInterrupted(SluiceError):
    """A follower could not read the job's event stream for events.FOLLOW_RETRY_S."""

    code = "stream_interrupted"
    http_status = 503
    default_message = ("The job's event stream could not be read. The generation was cancelled; "
                       "only the tokens it produced are charged.")
