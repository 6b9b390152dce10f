"""User-facing errors: a message for the person, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's config or data. The CLI prints ``problems`` and exits 1."""

    def __init__(self, problems: list[str] | str, header: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.header = header
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.header] if self.header else []
        if len(self.problems) == 1 and not self.header:
            return self.problems[0]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ConfigError(UserError):
    """Problems found in a run config, each naming its key path and the fix."""
