import sys

from loadtests.peers.catalog import main

sys.exit(main())
