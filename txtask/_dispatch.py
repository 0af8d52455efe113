"""
Find the interface and the callable a call names, inside the worker.

Plain Python: the worker imports it without Twisted. The rules, by what the
interface is:

  - a module: the names in its C{__all__}, otherwise the functions defined
    in that module itself (not ones it imported);
  - a mapping: its items; an instance: its attributes;
  - a class: instantiated once, after setup, then used as an instance;
  - a plain function: C{f(method, *args)} for a method call, C{f(*args)}
    for a direct call.

Names starting with C{_} are never dispatched.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Mapping

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def resolve(path: str) -> Any:
    """
    Import C{package.module} or C{package.module:attribute.attribute}.

    @raise ImportError: The module cannot be imported.
    @raise AttributeError: The module has no such attribute.
    """
    module_name, _, attribute = path.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in filter(None, attribute.split(".")):
        target = getattr(target, part)
    return target


class Dispatcher:
    """
    Look up the callable for a method name on one interface object.
    """

    def __init__(self, interface: Any) -> None:
        self._interface = interface
        self._is_function = isinstance(
            interface, (types.FunctionType, types.BuiltinFunctionType)
        )
        # Module lookups that passed the rules, by name. A hit still checks
        # that the module holds the same object, so rebinding a name in the
        # module is seen at once. Limitation: a name removed from a module's
        # __all__ after it was first called stays callable in that worker;
        # rebinding __all__ at run time is not a supported way to revoke it.
        self._module_hits: dict[str, Any] = {}
        self._namespace: dict[str, Any] | None = (
            vars(interface) if isinstance(interface, types.ModuleType) else None
        )

    @classmethod
    def build(cls, interface: Any) -> Dispatcher:
        """
        Prepare an interface for calls, instantiating it if it is a class.
        """
        if isinstance(interface, type):
            interface = interface()
        return cls(interface)

    def lookup(self, method: str | None) -> Callable[..., Any]:
        """
        Return the callable that runs C{method} (C{None}: a direct call).

        @raise AttributeError: The interface has no such public method, or
            it is not callable; the message names the method.
        """
        interface = self._interface
        if method is None:
            if not callable(interface):
                raise TypeError("the interface is not callable; call a method")
            return interface
        namespace = self._namespace
        if namespace is not None:
            target = self._module_hits.get(method)
            if target is not None and namespace.get(method) is target:
                return target
        if not method or method.startswith("_"):
            raise AttributeError(
                f"method {method!r} is private: names starting with '_' "
                f"are never dispatched"
            )
        if self._is_function:
            return lambda *args, **kwargs: interface(method, *args, **kwargs)

        target = self._find(method)
        if not callable(target):
            raise AttributeError(f"interface attribute {method!r} is not callable")
        if namespace is not None:
            self._module_hits[method] = target
        return target

    def _find(self, method: str) -> Any:
        interface = self._interface
        missing = AttributeError(f"interface has no method {method!r}")
        if isinstance(interface, types.ModuleType):
            return self._find_in_module(interface, method, missing)
        if isinstance(interface, Mapping):
            try:
                return interface[method]
            except KeyError:
                raise missing from None
        try:
            return getattr(interface, method)
        except AttributeError:
            raise missing from None

    @staticmethod
    def _find_in_module(
        module: types.ModuleType, method: str, missing: AttributeError
    ) -> Any:
        exported = getattr(module, "__all__", None)
        target = getattr(module, method, None)
        if exported is not None:
            if method not in exported or target is None:
                raise missing
            return target

        # Without __all__ only functions the module defines itself count:
        # one it imported (from os import system) must not be reachable.
        if (
            not isinstance(target, types.FunctionType)
            or target.__module__ != module.__name__
        ):
            raise missing
        return target
