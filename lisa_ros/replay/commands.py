"""Commands files: parsing ``<seconds> <text>`` lines and mapping their times onto the bag's time
line (format in the ``lisa_ros.replay`` package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from lisa_ros.replay.bags import NS
from lisa_ros.replay.errors import ReplayError

#: Command-file times at least this large (seconds) are absolute Unix times, not bag offsets.
ABSOLUTE_TIME_THRESHOLD = 1e8


@dataclass(frozen=True)
class TimedCommand:
    """A command from a commands file: bag time in ns, text, and ``file:line`` it came from."""

    time_ns: int
    text: str
    origin: str


def parse_commands_file(path: str | Path) -> list[tuple[Decimal, str, int]]:
    """Read a commands file (format in the ``lisa_ros.replay`` docstring).

    Returns:
        ``(seconds, text, line number)`` per command, in file order; ``seconds`` exactly as
        written (a ``Decimal``).

    Raises:
        ReplayError: the file cannot be read, or a line is not ``<seconds> <text>`` with finite
            ``seconds >= 0`` and non-empty text (naming ``file:line``).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ReplayError(f"--commands {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayError(f"--commands {path}: cannot be read as UTF-8 text ({exc})") from None
    out: list[tuple[Decimal, str, int]] = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = stripped.split(None, 1)
        try:
            seconds = Decimal(parts[0])  # exact: Unix times in ns need more than a float
        except InvalidOperation:
            seconds = Decimal("NaN")
        if len(parts) < 2 or not seconds.is_finite() or seconds < 0:
            raise ReplayError(
                f"{path}:{number}: expected '<seconds> <command text>' with seconds >= 0, "
                f"got {stripped!r}"
            )
        out.append((seconds, parts[1].strip(), number))
    return out


def load_commands_file(path: str | Path, bag_start_ns: int) -> list[TimedCommand]:
    """Commands of a file on the bag's time line, sorted by time (file order for equal times).

    Times below ``ABSOLUTE_TIME_THRESHOLD`` are seconds after ``bag_start_ns``; larger ones are
    absolute seconds since the Unix epoch.
    """
    commands = []
    for seconds, text, number in parse_commands_file(path):
        offset = int((seconds * NS).to_integral_value())
        t_ns = offset if seconds >= ABSOLUTE_TIME_THRESHOLD else bag_start_ns + offset
        commands.append(TimedCommand(t_ns, text, f"{path}:{number}"))
    return sorted(commands, key=lambda c: c.time_ns)
