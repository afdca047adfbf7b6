"""User-facing errors: printed as one line (no traceback) by the CLI, exit status 2."""


class UserError(Exception):
    """Bad input from the user (recipe, data, flags). The message names the file, key and reason."""


class RecipeError(UserError):
    pass


class DataError(UserError):
    pass
