"""``python -m benchmarks``: run the suite (``python -m benchmarks sse``: the SSE harness)."""

import sys

if sys.argv[1:2] == ["sse"]:
    from benchmarks.sse import main as sse_main

    raise SystemExit(sse_main(sys.argv[2:]))

from benchmarks.run import main

raise SystemExit(main())
