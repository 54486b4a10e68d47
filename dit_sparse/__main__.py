"""``python -m dit_sparse``: the ``dit-sparse`` command."""

import sys

from dit_sparse.cli import main

if __name__ == "__main__":
    sys.exit(main())
