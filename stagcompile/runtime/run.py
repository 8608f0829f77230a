"""Entry point: `python BUNDLE/runtime/run.py --prompt ...` (see runtime/cli.py for options)."""

import importlib
import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent))
    cli = importlib.import_module(f"{here.name}.cli")
    sys.exit(cli.main(default_bundle=here.parent))
