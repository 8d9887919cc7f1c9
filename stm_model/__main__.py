"""`python -m stm_model ...` is the `stm` command."""
import sys

from .cli import main

sys.exit(main())
