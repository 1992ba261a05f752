from smallcap.cli import main

raise SystemExit(main())
