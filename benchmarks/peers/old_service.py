"""The old service's way, for the comparison in docs/performance.md: Flask's development server
(threaded), PyTorch eager, one window per request, the same JSON. Run:
``API_KEY=k python -m benchmarks.peers.old_service PORT``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from flask import Flask, jsonify, request

from export.checkpoint import load_model

WEIGHTS = os.environ.get("WEIGHTS", "artifacts/best_attention_unet.pth")
API_KEY = os.environ["API_KEY"]
model = load_model(WEIGHTS)
app = Flask(__name__)


@app.post("/api/v1/denoising")
def denoise():
    if request.headers.get("x-api-key") != API_KEY:
        return jsonify({"error": "Invalid API key"}), 401
    x = np.asarray(request.get_json()["ecg_signal"], dtype=np.float32)
    mu, sigma = x.mean(), x.std() + 1e-8
    with torch.no_grad():
        out = model(torch.from_numpy((x - mu) / sigma)[None, None, :]).numpy()
    return jsonify({"modelVersion": 6, "denoised_signal": out.reshape(-1).tolist()})


@app.get("/readyz")
def ready():
    return jsonify({"status": "ready"})


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
