"""`python -m stm_model ...` is the `stm` command."""
import sys

from stm_model.cli import main

sys.exit(main())
