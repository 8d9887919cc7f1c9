"""Which version of a patched package is installed, judged by the source of its functions:
the integrations patch only code whose read they reproduce exactly."""
import hashlib
import importlib.metadata
import inspect


def fingerprint(function):
    """The first 16 hex digits of the sha256 of function's source; None without source."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def installed_version(distribution, module):
    """The installed version of `distribution`, or a phrase saying `module` came from
    elsewhere."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return f"none (no {distribution} distribution; {module} imported from elsewhere)"


def unknown_functions(functions, known_versions):
    """None when every function of {name: function} has the fingerprint of one known version
    ({version: {name: fingerprint}}); else (the newest known version, the names whose
    fingerprints differ from it)."""
    fingerprints = {name: fingerprint(function) for name, function in functions.items()}
    if any(all(known[name] == value for name, value in fingerprints.items())
           for known in known_versions.values()):
        return None
    newest = list(known_versions)[-1]
    return newest, [name for name, value in fingerprints.items()
                    if known_versions[newest][name] != value]
