"""`python -m adaptivellm.benchmark ...`"""

import sys

from adaptivellm.benchmark.cli import main

sys.exit(main())
