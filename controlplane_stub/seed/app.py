"""The seed app: answers "Hello from Kubernetes!" on port 5000 (PORT overrides it)."""
from __future__ import annotations

import os
import socket

from flask import Flask

app = Flask(__name__)


@app.route("/")
def hello() -> str:
    return "Hello from Kubernetes!\n"


@app.route("/healthz")
def healthz() -> str:
    return "ok\n"


@app.route("/whoami")
def whoami() -> str:
    # Tests use this to see which pod answered through a Service.
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}\n"


def any_address() -> str:
    """"::" where IPv6 is on: one socket answers both families (Linux takes IPv4 on it too), so
    the app serves a dual-stack pod's IPv6 address as well; "0.0.0.0" otherwise."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
        return "::"
    except OSError:
        return "0.0.0.0"


if __name__ == "__main__":
    app.run(host=any_address(), port=int(os.environ.get("PORT", "5000")), threaded=True)
