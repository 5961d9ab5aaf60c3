"""The ``mtpserve`` command: ``main.py`` builds the parser and runs a subcommand; each subcommand is
one module (``serve``, ``generate``, ``stress``, ``bench``, ``bench_serve``, ``train_head``) with
``add_args(p)`` and ``run(args)``."""
