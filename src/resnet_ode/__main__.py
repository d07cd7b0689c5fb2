import sys

from resnet_ode.cli import main

sys.exit(main())
