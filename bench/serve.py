"""Load-test an OpenAI-compatible server (Conveyor, vLLM, SGLang): TTFT, TPOT, ITL, E2E
latency, throughput and goodput. A thin wrapper; the same tool is `conveyor bench serve`.

    python bench/serve.py --base-url http://127.0.0.1:8000 --num-prompts 32 \\
        --request-rate 8 --input-len 64 --output-len 32 --result-file /tmp/lg/r.json
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    # Run as a script from a checkout: make the repository's `server` package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from server.benchmarks.serve import main as serve_main

    return serve_main()


if __name__ == "__main__":
    sys.exit(main())
