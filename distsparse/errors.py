"""User-facing errors: printed as one line (no traceback) by the CLI, exit status 2."""


class UserError(Exception):
    """Bad input from the user (recipe, data, flags). The message names the file, key and reason."""


class RecipeError(UserError):
    pass


class DataError(UserError):
    pass


def run_command(name: str, main, argv: list[str]) -> int:
    """Run ``main(argv)``; a UserError becomes one line on stderr and exit status 2.

    Under a multi-process launch every rank meets the same bad input; only rank 0 says so, so the
    user reads the line once."""
    import os
    import sys

    try:
        return main(argv) or 0
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"distsparse {name}: error: {err}", file=sys.stderr)
        return 2
