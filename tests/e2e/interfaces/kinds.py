"""
One interface of every kind the worker dispatches to.
"""

__all__ = ["exported", "constant"]

constant = 7


def exported(value):
    return ["module", value]


def not_exported(value):
    return value


MAPPING = {"double": lambda value: value * 2}


class Counter:
    """A class: instantiated once per worker."""

    def __init__(self):
        self.count = 0

    def bump(self):
        self.count += 1
        return self.count

    def __call__(self, value):
        return ["called", value]


INSTANCE = Counter()


def dispatcher(method, *args, **kwargs):
    """A plain function: receives the method name first."""
    return [method, list(args), kwargs]


def direct(*args):
    return ["direct", list(args)]
