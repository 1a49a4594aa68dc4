"""The engine's default token budget (--token-budget): declared once, read by the CLI and by the
operator (a group written before the planner chose budgets runs with it)."""

DEFAULT_TOKEN_BUDGET = 4096
