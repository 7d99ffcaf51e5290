"""`python -m medtune.infer.smoke FILE PROMPT MAX_TOKENS`: answer once with llama.cpp, print one JSON line.

Run as a child process by the export checks so that a llama.cpp crash cannot take the caller down.
"""

from __future__ import annotations

import json
import sys

from medtune.infer.engines import LlamaCppEngine


def main() -> None:
    path, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    engine = LlamaCppEngine(path, n_ctx=2048)
    result = engine.complete([{"role": "user", "content": prompt}], temperature=0.0, top_p=1.0,
                             max_tokens=max_tokens)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
