import sys

from lazyfs.daemon.server import main

sys.exit(main())
