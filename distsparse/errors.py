"""User-facing errors: printed as one line (no traceback) by the CLI, exit status 2."""


class UserError(Exception):
    """Bad input from the user (recipe, data, flags). The message names the file, key and reason."""


class RecipeError(UserError):
    pass


class DataError(UserError):
    pass


def run_command(name: str, main, argv: list[str]) -> int:
    """Run ``main(argv)``; a UserError becomes one line on stderr and exit status 2."""
    import sys

    try:
        return main(argv) or 0
    except UserError as err:
        print(f"distsparse {name}: error: {err}", file=sys.stderr)
        return 2
