"""Subcommands of the ``qllm`` CLI; each module has ``add_parser(subparsers)`` and ``run(args)``."""
