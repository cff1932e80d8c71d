import sys

from udpflannel.cli import main

sys.exit(main())
