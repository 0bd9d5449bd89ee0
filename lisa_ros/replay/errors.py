"""The replay's user error: one clear message naming the input (reported as ``prog: error:``)."""

from __future__ import annotations

from lisa_model.cli.common import UserError


class ReplayError(UserError):
    """A problem with the replay's input (bag, topic, commands file, output path)."""
