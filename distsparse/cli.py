"""``distsparse train | export | verify | recipe check``: one entry point, user errors as one line."""
from __future__ import annotations

import sys

from .errors import UserError

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
    try:
        if command == "train":
            from .train import main as run
        elif command == "export":
            from .export.cli import export_main as run
        elif command == "verify":
            from .export.cli import verify_main as run
        elif command == "recipe":
            from .recipe.check import main as run
        else:
            print(f"distsparse: unknown command {command!r}\n{USAGE}", file=sys.stderr)
            return 2
        return run(rest) or 0
    except UserError as err:
        print(f"distsparse {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
