"""`python -m afc.operator` is `afc-operator`."""
import sys

from afc.operator.cli import main

sys.exit(main())
