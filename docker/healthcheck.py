"""Container health probe: exit 0 when the server's /health answers 200, 1 otherwise.

Reads `KVMUX_HEALTH_URL` (default http://127.0.0.1:8000/health) and, when `/health` is behind
auth, sends `KVMUX_API_KEY` as a Bearer token. Standard library only, so it runs in any image.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = os.environ.get("KVMUX_HEALTH_URL", "http://127.0.0.1:8000/health")
    request = urllib.request.Request(url)
    key = os.environ.get("KVMUX_API_KEY")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=float(os.environ.get("KVMUX_HEALTH_TIMEOUT_S", "4"))) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
