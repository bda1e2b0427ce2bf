import sys

from bnorm.cli import main

sys.exit(main())
