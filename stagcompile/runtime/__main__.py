"""`python -m runtime` from inside a bundle folder."""

import sys
from pathlib import Path

from .cli import main

sys.exit(main(default_bundle=Path(__file__).resolve().parent.parent))
