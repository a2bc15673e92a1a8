from portal.errors import SluiceError


class IdempotencyConflict(SluiceError):
    code = "idempotency_conflict"
    http_status = 409
    default_message = "This Idempotency-Key was used with a different request body."


class JobNotCancellable(SluiceError):
    code = "invalid_parameter"
    http_status = 400
    default_message = "The job has already finished."
