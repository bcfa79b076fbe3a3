"""The peer: the same ONNX model served the way a competent engineer would in an afternoon.

FastAPI on uvicorn, one onnxruntime session with its default settings, one window per request,
no batching, the same JSON in and out (``{"ecg_signal": [...]}`` → ``{"modelVersion", "denoised_signal"}``),
the same z-score normalization, and an ``x-api-key`` header checked against one key. Run:
``MODEL_PATH=artifacts/attention_unet.onnx API_KEY=k uvicorn benchmarks.peers.fastapi_app:app --port 8001``.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel

session = ort.InferenceSession(os.environ["MODEL_PATH"], providers=["CPUExecutionProvider"])
API_KEY = os.environ["API_KEY"]
app = FastAPI()


class Signal(BaseModel):
    ecg_signal: list[float]


@app.post("/api/v1/denoising")
def denoise(body: Signal, x_api_key: str | None = Header(default=None)) -> dict:
    if x_api_key != API_KEY:
        raise HTTPException(401, "Invalid API key")
    if len(body.ecg_signal) != 1300:
        raise HTTPException(400, "ecg_signal must have 1300 values")
    x = np.asarray(body.ecg_signal, dtype=np.float32)
    mu, sigma = x.mean(), x.std() + 1e-8
    out = session.run(None, {"ecg": ((x - mu) / sigma)[None, None, :]})[0]
    return {"modelVersion": 6, "denoised_signal": out.reshape(-1).tolist()}


@app.get("/readyz")
def ready() -> dict:
    return {"status": "ready"}
