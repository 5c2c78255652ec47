import sys

from kl_fused.cache.cli import main

sys.exit(main())
