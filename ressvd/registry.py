"""One registry type for the plug-ins that a run plan calls by name: methods, allocations, healers.

Each plug-in kind lives in its own package, one file per plug-in, with a class decorated by that
kind's `register`; `available()` imports every module of the package first, so a new file is found
without being listed anywhere. Registering a second class under a taken name is an error."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str):
        self.kind, self.package = kind, package
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        if cls.name in self._classes and self._classes[cls.name] is not cls:
            raise ValueError(f"{self.kind} name {cls.name!r} registered twice")
        self._classes[cls.name] = cls
        return cls

    def available(self) -> dict[str, type[T]]:
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{info.name}")
        return dict(sorted(self._classes.items()))

    def get(self, name: str, **options: Any) -> T:
        classes = self.available()
        if name not in classes:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(classes) or 'none'}")
        return classes[name](**options)
