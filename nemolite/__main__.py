import sys

from nemolite.cli import main

sys.exit(main())
