"""How the integrations patch an instance: our methods are the package's own functions bound to
the instance with a backend (functools.partial), set as instance attributes, so that they can
be told apart from anyone else's and removed again."""
import functools
import types

MISSING = object()  # an attribute the instance does not have


def install(obj, name, function, backend):
    """obj.name = function bound to obj with backend, as an instance attribute."""
    setattr(obj, name, types.MethodType(functools.partial(function, backend=backend), obj))


def backend_of(method, functions):
    """The backend of one of our installed methods (one of `functions`, bound by install);
    None for anything else."""
    partial = getattr(method, "__func__", None)
    if isinstance(partial, functools.partial) and partial.func in functions:
        return partial.keywords["backend"]
    return None


def check_free(obj, name, functions):
    """ValueError when obj.name is replaced on the instance by something other than one of
    our `functions`: the fused read would silently discard it."""
    method = vars(obj).get(name, MISSING)
    if method is not MISSING and backend_of(method, functions) is None:
        raise ValueError(f"{type(obj).__name__}.{name} is already replaced on this instance by "
                         f"{method!r}; the fused read would silently discard it")
