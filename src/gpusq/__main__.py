import sys

from gpusq.cli import main

sys.exit(main())
