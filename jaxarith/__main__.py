import sys

from jaxarith.cli import main

sys.exit(main())
