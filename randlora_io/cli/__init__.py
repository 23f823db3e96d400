"""The ``randlora-io`` command line (click). Thin: parse, call the library, print."""
