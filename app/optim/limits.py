"""How large a session may be: counts checked before anything is allocated. No imports, so that the
request parsers (and the worker processes that run them) can check them without loading the numerics."""

MAX_PARAMETERS = 10_000
MAX_GROUPS = 1_000
MAX_NAME_LENGTH = 256
# A session's checkpoint holds each parameter and at most four optimizer state tensors per parameter.
MAX_SESSION_TENSORS = 5 * MAX_PARAMETERS

MAX_SCHEDULE_POINTS = 100_000
"""Steps x groups of one schedule preview or look ahead: about 0.1 s of Python (off the event loop, in a
thread that still shares the interpreter) and a 2 MB answer."""
