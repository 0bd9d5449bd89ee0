"""The node's settings as ROS 2 parameters: typed declarations, descriptors, checks on set.

Built from the one declaration in :mod:`lisa_ros.settings`:

- :func:`descriptor` gives a statically typed ``ParameterDescriptor`` with the description, the
  allowed values (``IntegerRange``/``FloatingPointRange``, choices in
  ``additional_constraints``) and ``read_only`` for settings fixed at start-up, which is what
  ``ros2 param describe`` shows;
- :class:`ParameterGuard` declares them on a node and refuses a bad value at once, with a reason
  that names the parameter and its allowed values (``ros2 param set`` prints it). A double
  accepts an integer (``ros2 param set ... max_rate_hz 3``). A bad value given at start-up
  (params file, ``-p``) does not stop the node from starting: the parameter keeps its default
  and configure fails naming it until a good value is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.parameter import Parameter

from lisa_ros.settings import BY_NAME, SETTINGS, Applies, Setting, SettingError, check_combination

_PARAMETER_TYPES = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}
#: The widest ranges a ROS descriptor can state.
_INT_LIMITS = (-(2**63), 2**63 - 1)
_FLOAT_LIMITS = (-1.7976931348623157e308, 1.7976931348623157e308)

_WHEN = {
    Applies.LIVE: "takes effect at once",
    Applies.CONFIGURE: "takes effect on the next configure (cleanup, then configure)",
    Applies.STARTUP: "read-only: set it at start-up (launch argument, params file or -p)",
}


def descriptor(s: Setting) -> ParameterDescriptor:
    """The statically typed descriptor of a setting."""
    constraints = f"{s.allowed()}; {_WHEN[s.applies]}"
    d = ParameterDescriptor(
        name=s.name,
        type=_PARAMETER_TYPES[s.type],
        description=s.description + (f" ({s.unit})" if s.unit else ""),
        additional_constraints=constraints,
        read_only=s.read_only,
        dynamic_typing=False,
    )
    if s.type is int and (s.minimum is not None or s.maximum is not None):
        low, high = _INT_LIMITS
        d.integer_range = [
            IntegerRange(
                from_value=int(low if s.minimum is None else s.minimum),
                to_value=int(high if s.maximum is None else s.maximum),
                step=0,
            )
        ]
    elif s.type is float and (s.minimum is not None or s.maximum is not None):
        low, high = _FLOAT_LIMITS
        d.floating_point_range = [
            FloatingPointRange(
                from_value=float(low if s.minimum is None else s.minimum),
                to_value=float(high if s.maximum is None else s.maximum),
                step=0.0,
            )
        ]
    return d


class ParameterGuard:
    """Declares the settings on ``node`` and checks every change (see the module docstring).

    The node calls :meth:`filter` from its ``set_parameters``/``set_parameters_atomically``
    overrides, before rclpy applies the descriptors (rclpy's own type error does not name the
    parameter).
    """

    def __init__(self, node: Any, settings: Sequence[Setting] = SETTINGS) -> None:
        self._node = node
        self._settings = tuple(settings)
        #: Bad start-up values, by name; cleared when a good value is set.
        self.startup_errors: dict[str, SettingError] = {}
        # rclpy keeps the start-up values (params files, -p, parameter_overrides) here; they are
        # checked before declaring so that a bad one cannot abort the node's construction.
        overrides = getattr(node, "_parameter_overrides", {})
        for s in self._settings:
            value = s.default
            if s.name in overrides:
                try:
                    value = s.check(overrides[s.name].value)
                except SettingError as exc:
                    self.startup_errors[s.name] = exc
            node.declare_parameter(s.name, value, descriptor(s), ignore_override=True)

    def values(self) -> dict[str, Any]:
        """The current value of every setting."""
        return {s.name: self._node.get_parameter(s.name).value for s in self._settings}

    def check_startup(self) -> None:
        """Raise the first bad start-up value that has not been fixed since."""
        for s in self._settings:
            if s.name in self.startup_errors:
                raise self.startup_errors[s.name]

    def filter(self, parameters: Sequence[Parameter]) -> tuple[list[Parameter], str | None]:
        """``(parameters with doubles coerced, None)``, or ``(parameters, reason)`` when one of
        them must be refused."""
        out: list[Parameter] = []
        changed: dict[str, Any] = {}
        for p in parameters:
            s = BY_NAME.get(p.name)
            if s is None:
                out.append(p)
                continue
            if s.read_only:
                return list(parameters), str(SettingError(s.name, _WHEN[Applies.STARTUP]))
            try:
                value = s.check(p.value)
            except SettingError as exc:
                return list(parameters), str(exc)
            changed[s.name] = value
            out.append(p if type(p.value) is type(value) else Parameter(p.name, value=value))
        if changed:
            try:
                check_combination({**self.values(), **changed})
            except SettingError as exc:
                return list(parameters), f"{exc}; set both at once (ros2 param load)"
        return out, None

    def accepted(self, parameters: Sequence[Parameter]) -> None:
        """Forget the start-up errors of parameters that were set since."""
        for p in parameters:
            self.startup_errors.pop(p.name, None)


def refused(reason: str) -> SetParametersResult:
    return SetParametersResult(successful=False, reason=reason)


def when(s: Setting) -> str:
    """When a change of ``s`` takes effect, in words."""
    return _WHEN[s.applies]
