"""``distsparse train | export | verify | recipe check``: one entry point, user errors as one line."""
from __future__ import annotations

import importlib
import sys

from .errors import run_command

# Each command's module, imported only when called: `distsparse recipe check` needs no torch model code.
COMMANDS = {"train": "distsparse.train:main", "export": "distsparse.export.cli:export_main",
            "verify": "distsparse.export.cli:verify_main", "recipe": "distsparse.recipe.check:main"}

USAGE = """usage: distsparse COMMAND [ARGS]

commands:
  train          sparse transfer learning with a recipe (also: accelerate launch -m distsparse.train)
  export         export a trained model to ONNX and verify it
  verify         re-check a deployment folder that export wrote (sha256, sparsity, Q/DQ, parity)
  recipe check   validate a recipe and print its timeline
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"distsparse: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    module, function = COMMANDS[command].split(":")
    return run_command(command, lambda argv: getattr(importlib.import_module(module), function)(argv), rest)


if __name__ == "__main__":
    sys.exit(main())
