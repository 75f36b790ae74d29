import sys

from qllm.cli import main

sys.exit(main())
