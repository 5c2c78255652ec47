import sys

from kl_fused.bench import main

sys.exit(main())
