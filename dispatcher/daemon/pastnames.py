"""The names of a pool's executions started before a time, listed once, as far back as asked.

A request without an idempotency key whose message was sent before this reign began but
first received in it may be the twin of a message SQS stored twice (one message id, one
``SentTimestamp``), whose other copy a predecessor started - under another name, if
``key_attribute`` changed in between. That execution started after the message was sent.
So the names of the executions started since then answer the question for every such
request at once: a ``ListExecutions`` of the state machine (any status, newest first, a
thousand a page) reaches back to the oldest such request seen, lazily, and each lookup is a
set membership - not a ``DescribeExecution`` per message of the backlog. A request older
than `MAX_PAGES` pages reach is not looked for (the residual: a twin that waited behind
more executions than that).

The listing is eventually consistent; it is made in this reign, which began D and the
start grace after a predecessor could last send a start (the take-over wait), so every
start of a predecessor shows in it.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from types_aiobotocore_stepfunctions import SFNClient

MAX_PAGES = 20
"""ListExecutions pages (of 1,000) per pool and reign, at most."""


class PastNames:
    """Names of one state machine's executions started since `covered_since`."""

    def __init__(self, sfn: SFNClient, state_machine_arn: str, *, max_pages: int = MAX_PAGES):
        self.sfn = sfn
        self.state_machine_arn = state_machine_arn
        self.max_pages = max_pages
        self.names: set[str] = set()
        self.covered_since = math.inf  # wall-clock seconds: every start since is in `names`
        self.pages = 0
        self._token: str | None = None
        self._exhausted = False  # listed to the state machine's first execution
        self._lock = anyio.Lock()

    async def cover(self, since: float) -> bool:
        """List until `names` holds every execution started since ``since`` (wall-clock
        seconds); False when that would take more than `max_pages` pages. A failed call
        raises (the caller must not start on a guess)."""
        async with self._lock:
            while not self._exhausted and self.covered_since > since:
                if self.pages >= self.max_pages:
                    return False
                kwargs: dict[str, object] = {
                    "stateMachineArn": self.state_machine_arn,
                    "maxResults": 1000,
                }
                if self._token is not None:
                    kwargs["nextToken"] = self._token
                page = await self.sfn.list_executions(**kwargs)  # type: ignore[arg-type]
                self.pages += 1
                oldest = self.covered_since
                for item in page.get("executions", []):
                    self.names.add(str(item["name"]))
                    started = item.get("startDate")
                    if isinstance(started, datetime):
                        oldest = min(oldest, started.timestamp())
                self.covered_since = oldest
                self._token = page.get("nextToken")
                if not self._token:
                    self._exhausted = True
            return True
