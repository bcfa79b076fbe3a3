# Small CPU-only image of the denoising service: runtime requirements only (no torch), the
# exported ONNX model with its manifest, a non-root user. Configuration comes from the environment
# (see .env.example); tests/service/test_container.py runs these same steps in a fresh venv.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt ./
RUN pip install -r requirements.txt

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin heartify \
    && mkdir -p /app/data \
    && chown heartify /app/data

COPY service/ ./service/
COPY --chmod=0644 artifacts/*.onnx artifacts/manifest.json ./artifacts/

# Listen on every interface inside the container; keep the SQLite file and the mail folder
# (used only when SMTP_HOST is unset) in the one writable, mountable place.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    DATABASE_URL=sqlite:////app/data/heartify.db \
    OUTBOX_DIR=/app/data/outbox

USER heartify
VOLUME ["/app/data"]
EXPOSE 8000

# slim has no curl: ask /healthz with the interpreter that is already there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "service"]
