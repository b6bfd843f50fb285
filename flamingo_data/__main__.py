import sys

from flamingo_data.cli.main import main

sys.exit(main())
