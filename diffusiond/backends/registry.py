"""Backend names -> plug-ins, found by looking, not by a list.

Every module of this package that defines a module-level ``PLUGIN`` (a
``BackendPlugin``) is a backend, so adding one is adding its file. Plug-ins
that live elsewhere (a test's fake backend, an out-of-tree runtime) call
``register``. A plug-in module imports without its runtime installed (the
runtime is imported when a backend is created); one that fails to import all
the same is logged and skipped, so one broken backend does not take the others
down.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
import threading
from pathlib import Path

from diffusiond.backends.base import Backend, BackendPlugin, BackendSettings
from diffusiond.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

_discovered: dict[str, BackendPlugin] | None = None
_registered: dict[str, BackendPlugin] = {}
_lock = threading.Lock()


def _discover() -> dict[str, BackendPlugin]:
    import diffusiond.backends as package

    found: dict[str, BackendPlugin] = {}
    declared_by: dict[str, str] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module_name = f"{package.__name__}.{info.name}"
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # a broken plug-in is skipped, not fatal
            log.warning("backend module %s could not be imported, so its backend is not offered: %s", module_name, exc)
            continue
        plugin = getattr(module, "PLUGIN", None)
        if plugin is None:
            continue
        if not isinstance(plugin, BackendPlugin):
            log.warning("%s.PLUGIN is a %s, not a BackendPlugin: skipped", module_name, type(plugin).__name__)
            continue
        if plugin.name in found:
            log.warning("backend %r is declared by %s and by %s: the second is skipped",
                        plugin.name, declared_by[plugin.name], module_name)
            continue
        found[plugin.name] = plugin
        declared_by[plugin.name] = module_name
    return found


def plugins() -> dict[str, BackendPlugin]:
    """Every available backend plug-in by name: this package's, then registered ones."""
    global _discovered
    with _lock:
        if _discovered is None:
            _discovered = _discover()
        return {**_discovered, **_registered}


def register(plugin: BackendPlugin) -> None:
    """Offer a backend defined outside this package (``--backend``, ``create_backend``)."""
    existing = plugins().get(plugin.name)
    if existing is not None and existing is not plugin:
        raise ValueError(f"a backend named {plugin.name!r} is already registered")
    with _lock:
        _registered[plugin.name] = plugin


def unregister(name: str) -> None:
    with _lock:
        _registered.pop(name, None)


def get_plugin(name: str) -> BackendPlugin:
    available = plugins()
    try:
        return available[name]
    except KeyError:
        raise NotFound(f"backend {name!r} is not available; choose one of: {', '.join(available)}") from None


def create_backend(name: str, model_dir: Path, settings: BackendSettings) -> Backend:
    """Load ``model_dir`` on the named backend, with its options (its defaults when ``settings.options`` is None)."""
    plugin = get_plugin(name)
    options = settings.options
    if options is None:
        options = plugin.default_options()
    elif plugin.options_type is None or not isinstance(options, plugin.options_type):
        wanted = plugin.options_type.__name__ if plugin.options_type is not None else "no options"
        raise InvalidArgument("options", f"the {name} backend takes {wanted}, not a {type(options).__name__}")
    return plugin.load(model_dir, dataclasses.replace(settings, options=options))


def warm_up(backend: Backend) -> None:
    """Run the backend's own warm-up, if its plug-in has one (after loading, before serving)."""
    plugin = plugins().get(backend.name)
    if plugin is not None and plugin.warm_up is not None:
        plugin.warm_up(backend)
