import sys

from qllm.bench import main

sys.exit(main())
