import ast

import pytest

from inference.partial import partial_completion


@pytest.mark.parametrize(
    ("context", "generated", "expected"),
    [
        ("", "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a + b\n"),
        ("", "x = foo(1, [2, 3", "x = foo(1, [2, 3])"),
        ("", "name = 'unfinished", "name = 'unfinished'"),
        ("", 'doc = """starts a docstring\nand goes on', 'doc = """starts a docstring\nand goes on"""'),
        ("", "for item in items:\n", "for item in items:\n    pass\n"),
        ("", "if ready:\n    run(", "if ready:\n    run()"),
        ("", "class A:\n    def f(self):", "class A:\n    def f(self):\n        pass\n"),
        ("def f(x):\n", "    return {'a': x,", "    return {'a': x,}"),
    ],
)
def test_truncated_snippets_are_repaired(context, generated, expected):
    partial = partial_completion(generated, context=context)
    assert partial is not None
    assert partial.text == expected
    ast.parse(context + partial.text)
    assert generated.startswith(partial.text[: partial.kept_chars])


def test_garbage_tail_is_cut_back_to_the_longest_parsing_prefix():
    generated = "total = 0\nfor n in range(3):\n    total += n\n)))) oops"
    partial = partial_completion(generated)
    assert partial.text.startswith("total = 0\nfor n in range(3):\n    total += n\n")
    assert ")))) oops" not in partial.text
    ast.parse(partial.text)


def test_nothing_salvageable_gives_none():
    assert partial_completion(")") is None
