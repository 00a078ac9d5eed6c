"""``python -m icbs_opt.cli``: the ``icbs-opt`` command line."""

import sys

from icbs_opt.cli import main

if __name__ == "__main__":
    sys.exit(main())
