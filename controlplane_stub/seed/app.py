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


if __name__ == "__main__":
    app.run(host="0.0.0.0", port=int(os.environ.get("PORT", "5000")), threaded=True)
