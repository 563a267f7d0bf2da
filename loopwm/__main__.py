"""`python -m loopwm ...` is the `loopwm` command; it is the form `torchrun ... -m loopwm train CONFIG` launches."""

import sys

from loopwm.cli import main

if __name__ == "__main__":  # not when a spawned worker process re-imports this module
    sys.exit(main())
