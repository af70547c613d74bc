from zerotune.cli import main

raise SystemExit(main())
