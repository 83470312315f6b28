"""The ``vacfactory`` command. ``main.py`` builds the parser; each verb group is a module with
``register(subparsers)`` that adds its parsers with ``set_defaults(handler=...)``."""
