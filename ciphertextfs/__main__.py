"""`python -m ciphertextfs`: the same as the `ciphertextfs` command."""

import sys

from ciphertextfs.cli import main

sys.exit(main())
