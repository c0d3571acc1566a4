"""What the queue core saw happen, as data, for the server's metrics and history.

The core does no I/O and knows no metrics library: when :attr:`Core.observations
<wsq.core.engine.Core.observations>` is a list, each transition worth counting appends
one ``(kind, queue, seconds)`` tuple to it, and the caller drains the list (once per turn
of its loop is enough) into whatever keeps the numbers (``wsq.server.metrics``). ``None``
(the default) records nothing.
"""

from __future__ import annotations

ADDED = "added"
"""A new task is waiting; ``seconds`` is 0."""
STARTED = "started"
"""A task was offered to a worker (it left waiting); ``seconds`` is how long it waited
since it was last queued (enqueue-to-start latency)."""
COMPLETED = "completed"
"""A run completed; ``seconds`` is its run time, from its offer."""
FAILED = "failed"
"""A run failed with no retry left, so the task is failed; ``seconds`` is its run time."""
RETRIED = "retried"
"""A run failed and the task was queued again (it has retries left); ``seconds`` is its
run time. A manual retry of a failed task (protocol ``retry``) is one too, with 0."""
TIMED_OUT = "timed_out"
"""A run's deadline passed (its worker did not acknowledge it, or it ran past its
timeout); a ``failed`` or ``retried`` observation of the same run follows."""

KINDS = (ADDED, STARTED, COMPLETED, FAILED, RETRIED, TIMED_OUT)

Observation = tuple[str, str, float]
"""``(kind, queue, seconds)``."""
