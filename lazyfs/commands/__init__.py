"""One module per `lazyfs` subcommand.

Each module defines NAME (the subcommand), HELP (one line), add_arguments(parser) and
run(args) -> int. lazyfs.cli discovers them, so adding a command touches no other file.
"""
