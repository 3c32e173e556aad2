"""``sled-lm-eval``: lm-eval's command line with the ``sled`` model registered and sled-ext's task
folder on the include path unless one is given (see :mod:`sled_ext.harness`). A module of its own:
run as ``python -m sled_ext.harness``, the model would register twice (as ``__main__`` and again
when a task definition imports ``sled_ext.harness``)."""
import sys

from .harness import TASKS_DIR


def main(argv=None) -> None:
    from lm_eval.__main__ import cli_evaluate
    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(arg.split("=")[0] == "--include_path" for arg in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["sled-lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
