import sys

from flamingo_data.cli import main

sys.exit(main())
