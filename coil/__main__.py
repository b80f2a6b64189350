import sys

from coil.hypercoil import main

sys.exit(main())
