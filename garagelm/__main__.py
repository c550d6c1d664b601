import sys

from garagelm.cli import main

sys.exit(main())
