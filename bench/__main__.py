import sys

if sys.argv[1:2] == ["dryrun"]:
    from .dryrun import main

    raise SystemExit(main(sys.argv[2:]))
if sys.argv[1:2] == ["ram"]:
    from .ram import main

    raise SystemExit(main(sys.argv[2:]))
if sys.argv[1:2] == ["noderam"]:
    from .noderam import main

    raise SystemExit(main(sys.argv[2:]))
from .run import main

raise SystemExit(main())
