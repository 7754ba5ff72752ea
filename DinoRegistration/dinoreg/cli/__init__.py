"""The ``dinoreg`` command and its subcommands (thin: parse, call the app layer, print)."""
