"""`python -m moeport`: the same as the `moeport` command."""

import sys

from moeport.cli import main

sys.exit(main())
