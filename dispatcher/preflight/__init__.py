"""The preflight behind ``sfn-dispatcher check``: harmless AWS calls, one finding per check.

The checks share one `Context` whose look-ups are memoised, run concurrently, and never stop
at the first failure. The modules behind this public surface: `report` (what a check says),
`context` (the settings, clients and memoised look-ups the checks share), `rules` (pure
EventBridge pattern and queue-policy evaluation), `checks` and `wiring` (the checks), and
`runner` (running them all into a `Report`).
"""

from dispatcher.preflight.checks import check_stop_executions, check_task_tokens, queue_arn
from dispatcher.preflight.context import (
    LEASE_TABLE_ENV,
    LIMIT_PARAMETER_ENV,
    Clients,
    Context,
    Target,
    load_target,
    open_clients,
)
from dispatcher.preflight.report import (
    Check,
    Finding,
    Report,
    Result,
    Scope,
    Skip,
    Status,
    render,
)
from dispatcher.preflight.rules import (
    UnsupportedPatternError,
    glob,
    matches,
    merged_policy,
    mismatch,
    policy_allows,
    sample_event,
    status_pattern,
)
from dispatcher.preflight.runner import CHECKS, ENDPOINT, run_checks, run_one
from dispatcher.preflight.wiring import (
    ALL_STATUSES,
    check_lease_table,
    check_named_limit_parameter,
    check_policy,
    check_rule,
)

__all__ = [
    "ALL_STATUSES",
    "CHECKS",
    "ENDPOINT",
    "LEASE_TABLE_ENV",
    "LIMIT_PARAMETER_ENV",
    "Check",
    "Clients",
    "Context",
    "Finding",
    "Report",
    "Result",
    "Scope",
    "Skip",
    "Status",
    "Target",
    "UnsupportedPatternError",
    "check_lease_table",
    "check_named_limit_parameter",
    "check_policy",
    "check_rule",
    "check_stop_executions",
    "check_task_tokens",
    "glob",
    "load_target",
    "matches",
    "merged_policy",
    "mismatch",
    "open_clients",
    "policy_allows",
    "queue_arn",
    "render",
    "run_checks",
    "run_one",
    "sample_event",
    "status_pattern",
]
