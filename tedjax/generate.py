"""`python -m tedjax.generate --checkpoint runs/tiny --prompt "def "` (or `--hf DIR`): see tedjax/generation.py.

The code lives in `tedjax.generation`; this module is only the command, so that
`tedjax.generate` (the package attribute) stays the `generate` function.
"""

import sys

from tedjax.generation import main

if __name__ == "__main__":
    sys.exit(main())
