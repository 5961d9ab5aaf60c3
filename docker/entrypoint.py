"""The container's entry point: ``mtpserve`` with the container's arguments. ``MTPSERVE_<OPTION>``
variables are read by ``mtpserve`` itself, for every command (see ``mtpserve.cli.options``)."""

import sys

from mtpserve.cli.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
