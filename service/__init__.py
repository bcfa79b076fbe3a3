"""The Heartify denoising service: HTTP API, key flows, batched onnxruntime inference."""
