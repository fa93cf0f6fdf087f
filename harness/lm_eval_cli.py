"""`realign lm-eval ARGS...` (or `python -m harness.lm_eval_cli ARGS...`): lm-eval's own command line
with the `realign` model registered.

lm-eval's CLI can only name models its registry already holds and has no option to import a
third-party module, so this entry point imports harness.lm_eval_model (which registers `realign`)
and then runs lm-eval's CLI on the remaining arguments, unchanged: every lm-eval option, subcommand
(`run`, `ls`, `validate`) and output file behaves as documented by lm-eval.
"""

from __future__ import annotations

import sys
from typing import Sequence

from harness.errors import RealignError
from harness.lm_eval_shared import require_lm_eval
from harness.spec import SpecError


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's CLI on `argv` (default: this process's arguments) and return its exit status.
    A realign error (a bad model or defense spec, lm-eval missing) is one line and exit status 2,
    as in every realign command; lm-eval's own errors are lm-eval's."""
    args = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    try:
        require_lm_eval()
        import harness.lm_eval_model  # noqa: F401  (registers `realign` in lm-eval's model registry)
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm-eval", *args]  # lm-eval's parser reads sys.argv itself
        cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except (RealignError, SpecError) as exc:
        print(f"realign lm-eval: error: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
