"""``python -m fsdpck`` and ``python fsdpck`` (what torchrun runs for ``torchrun ... fsdpck verify``)."""

import os
import sys

if __package__ in (None, ""):
    # Run as a directory (``python fsdpck``): Python put the package dir itself first on
    # sys.path, where its modules would shadow the standard library's. Put the
    # repository root there instead so that ``import fsdpck`` finds the package.
    package_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != package_dir]
    sys.path.insert(0, os.path.dirname(package_dir))

from fsdpck.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
