"""tools/mutation.py's rewrite of decorated functions, which `make mutation` runs on a copy of
the project so that mutmut mutates them: the rewritten module behaves as the original."""
import textwrap

from tools.mutation import undecorated

SOURCE = textwrap.dedent('''
    import functools
    from typing import overload

    calls = []


    def logged(tag):
        def wrap(function):
            @functools.wraps(function)
            def wrapper(*args):
                calls.append(tag)
                return function(*args)
            return wrapper
        return wrap


    def doubled(function):
        return lambda *args: 2 * function(*args)


    @doubled
    @logged("inner")
    def f(x):
        """the docstring"""
        return x + 1


    @overload
    def g(x: int) -> int: ...


    def g(x):
        return f(x)


    class C:
        @staticmethod
        def h(x):
            return x
''')


def run(source):
    namespace = {}
    exec(compile(source, "<test>", "exec"), namespace)
    return namespace


def test_decorators_applied_by_assignment_in_the_same_order():
    rewritten = undecorated(SOURCE)
    assert "@doubled" not in rewritten and '@logged("inner")' not in rewritten
    assert 'f = doubled(logged("inner")(f))' in rewritten
    assert "@overload" in rewritten and "@staticmethod" in rewritten  # left as they are
    original, changed = run(SOURCE), run(rewritten)
    assert original["g"](3) == changed["g"](3) == 8
    assert original["calls"] == changed["calls"] == ["inner"]
    assert changed["C"].h(5) == 5


def test_a_source_without_decorated_functions_is_unchanged():
    source = ("def f(x):\n    return x\n\n\n"
              "class C:\n    @staticmethod\n    def h():\n        pass\n")
    assert undecorated(source) == source
